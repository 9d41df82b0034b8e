"""ResBM as a transformers model: `AutoConfig` / `AutoModelForCausalLM` know `model_type: resbm`
once `resbm_ds.hf` is imported (no `trust_remote_code`, no code in the export directory).

    import resbm_ds.hf                                # registers the classes below
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/x/hf")
    tok = AutoTokenizer.from_pretrained("runs/x/hf")
    out = model.generate(**tok("The President said", return_tensors="pt"), max_new_tokens=20)

`ResBMHFConfig` carries the model's `ModelSpec` (key `resbm`: the model and bottleneck sections, the
seed and the precision; not the run's paths, trackers or DeepSpeed settings), so every boundary
method and switch rebuilds exactly; the usual transformers fields (hidden_size, num_hidden_layers, ...)
are filled from it for tools that read them (lm-eval reads max_position_embeddings). The network
is the pipeline's single-process twin (`ResBMForCausalLM`, weights `resbm.layers.XX.*`), so
`from_pretrained` gives the consolidated model's logits. For `generate()` the attention layers
take transformers' own `Cache`, positions and padding mask for the length of one forward
(`model.layers.decoding`); every other layer (encoders, decoders, token tables) works per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import ModelSpec
from ..model.causal_lm import ResBMForCausalLM
from ..model.layers import Attention, decoding

MODEL_TYPE = "resbm"
# The output field of the KV cache: `cache` in transformers 5.x, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class ResBMHFConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, resbm: dict | None = None, **kwargs):
        # a spec, or (an export written before the spec existed) a run's whole config: the spec is kept
        spec = ModelSpec.from_dict(resbm) if resbm else ModelSpec()
        self.resbm = spec.to_dict()
        m = spec.model
        for key, value in dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                               num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                               num_key_value_heads=m.kv_heads, intermediate_size=m.ffn_size,
                               max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                               head_dim=m.head_dim).items():
            kwargs[key] = value   # derived: the `resbm` dict is the one source
        # A tied head reuses the embedding inside ResBMForCausalLM: there is no second weight for
        # transformers to tie.
        kwargs["tie_word_embeddings"] = False
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)

    def resbm_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.resbm)


class ResBMHFForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ResBMHFConfig
    base_model_prefix = "resbm"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _no_split_modules = []

    def __init__(self, config: ResBMHFConfig, model: ResBMForCausalLM | None = None):
        super().__init__(config)
        self.resbm = model if model is not None else ResBMForCausalLM(config.resbm_spec())
        self.attentions = [m for m in self.resbm.modules() if isinstance(m, Attention)]
        self.post_init()

    @classmethod
    def from_resbm(cls, model: ResBMForCausalLM) -> "ResBMHFForCausalLM":
        """Wrap a consolidated model (its weights, its dtype) without copying them."""
        config = ResBMHFConfig(resbm=model.spec.to_dict())
        config.dtype = model.dtype
        return cls(config, model)

    def _init_weights(self, module):
        # The layers initialise themselves (per-layer seeds, zero-init boundaries); from_pretrained
        # overwrites every weight anyway.
        pass

    def get_input_embeddings(self):
        return self.resbm.layers[0]

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        # transformers 5.x names the KV cache `cache`; 4.x (and older callers) `past_key_values`.
        cache = cache if cache is not None else kwargs.get("past_key_values")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ResBMHFForCausalLM takes a 2-D attention_mask [batch, past + new tokens]")
        if position_ids is None:
            if attention_mask is not None:   # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = attention_mask_4d(attention_mask, past, T, input_ids.device)
        with decoding(self.attentions, cache, position_ids, mask):
            logits = self.resbm(input_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:   # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


def attention_mask_4d(attention_mask, past: int, new: int, device) -> torch.Tensor | None:
    """bool [B, 1, new, past + new] for SDPA (True = attend), or None where plain causal attention
    (or, for one new token, attention to everything cached) is already right."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or new == 1):
        return None
    total = past + new
    q = torch.arange(past, total, device=device)[:, None]
    allowed = (torch.arange(total, device=device)[None] <= q)[None, None]
    if padded:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
    # A padding position's query sees nothing: let it see everything (finite, and never used).
    return allowed | ~allowed.any(-1, keepdim=True)


def register() -> None:
    """Teach transformers' Auto classes `model_type: resbm` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, ResBMHFConfig)
        AutoModelForCausalLM.register(ResBMHFConfig, ResBMHFForCausalLM)
    except ValueError:   # already registered (a second import through another path)
        pass
