"""transformers configs <-> resbm-ds model configs (Llama / Qwen2 / Mistral), and the checks that
refuse what our network would compute differently (see the package docstring)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cli import ConfigError, UserError
from ..config import Config, ModelConfig, ModelSpec, load_config

FAMILIES = ("llama", "qwen2", "mistral")
# Keys a config may carry beyond its class defaults without changing the network.
HARMLESS_EXTRA = {"auto_map", "torch_dtype", "dtype", "transformers_version", "architectures",
                  "_name_or_path", "generation_config", "tokenizer_class", "_attn_implementation_autoset"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class UnsupportedHFConfig(ConfigError):
    """A transformers config field our network cannot reproduce; `key` is the field's name."""

    def __init__(self, field: str, value, why: str, source: str = ""):
        ValueError.__init__(self, f"unsupported transformers config{f' ({source})' if source else ''}: "
                                  f"{field}={value!r}: {why}")
        self.key, self.value, self.allowed = field, value, why


# ---- configs ---------------------------------------------------------------------------------

def load_hf_config(src):
    """A transformers config object from itself or a local `save_pretrained` directory (no hub)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(src, PretrainedConfig):
        return src
    path = Path(src)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a transformers save_pretrained directory")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:   # bad JSON, no/unknown model_type, bad field
        raise UserError(f"{path / 'config.json'}: not a valid transformers config: "
                        f"{str(e).strip().splitlines()[0]}") from None


def sliding_window(hf) -> int | None:
    """The attention window the config applies, or None for full causal attention everywhere."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:   # Qwen2 (and newer configs) list the attention kind per layer
        kinds = set(layer_types) - {"full_attention", "sliding_attention"}
        if kinds:
            raise UnsupportedHFConfig("layer_types", sorted(kinds), "only full_attention / sliding_attention")
        return window if "sliding_attention" in layer_types else None
    return window   # Mistral: the window, when set, applies to every layer


def check_hf_config(hf, seq_len: int | None = None, source: str = "") -> None:
    """Raise UnsupportedHFConfig for every setting our Llama-style layers would compute differently."""
    def bad(field, value, why):
        raise UnsupportedHFConfig(field, value, why, source)

    family = getattr(hf, "model_type", None)
    if family not in FAMILIES:
        bad("model_type", family, f"supported families: {', '.join(FAMILIES)}")
    extra = set(hf.to_dict()) - set(type(hf)().to_dict()) - HARMLESS_EXTRA
    if extra:
        k = sorted(extra)[0]
        bad(k, getattr(hf, k, None), f"not a standard {type(hf).__name__} field; resbm-ds cannot tell "
                                     "what it changes (quantized or custom checkpoints are not supported)")
    if hf.hidden_act != "silu":
        bad("hidden_act", hf.hidden_act, "only 'silu' (SwiGLU MLP)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        bad("rope_parameters.rope_type", rope.get("rope_type"),
            "only plain RoPE ('default'); RoPE scaling (rope_scaling) is not implemented")
    prf = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        bad("partial_rotary_factor", prf, "only 1.0 (RoPE on the whole head)")
    if hf.hidden_size % hf.num_attention_heads:
        bad("num_attention_heads", hf.num_attention_heads, f"must divide hidden_size ({hf.hidden_size})")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim != hf.hidden_size // hf.num_attention_heads:
        bad("head_dim", head_dim, f"must equal hidden_size / num_attention_heads "
                                  f"({hf.hidden_size // hf.num_attention_heads})")
    if family == "llama" and getattr(hf, "attention_bias", False):
        bad("attention_bias", True, "Llama's attention_bias also adds an o_proj bias, not implemented "
                                    "(only Qwen2's q/k/v biases are)")
    if getattr(hf, "mlp_bias", False):
        bad("mlp_bias", True, "MLP biases are not implemented")
    if getattr(hf, "attention_dropout", 0.0):
        bad("attention_dropout", hf.attention_dropout, "attention dropout is not implemented; use 0.0")
    window = sliding_window(hf)
    if window is not None and seq_len is not None and window < seq_len:
        bad("sliding_window", window, f"a window shorter than the sequence (data.seq_len={seq_len}) is not "
                                      "implemented; full causal attention equals it only up to the window")


def model_config_from_hf(src, seq_len: int | None = None, init_std: float = 0.02) -> ModelConfig:
    """ModelConfig of the same network as a transformers Llama/Qwen2/Mistral config."""
    hf = load_hf_config(src)
    check_hf_config(hf, seq_len, source=str(src) if not hasattr(src, "to_dict") else "")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    max_len = hf.max_position_embeddings
    window = sliding_window(hf)
    if window is not None:   # runs must stay within the window, where attention is full attention
        max_len = min(max_len, window)
    return ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, max_seq_len=max_len,
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        norm_eps=float(hf.rms_norm_eps), tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        init_std=init_std, attention_bias=hf.model_type == "qwen2")


def config_from_hf(path, base: Config | None = None, overrides=()) -> Config:
    """A run Config (base, or the defaults + overrides) whose model is the transformers one in `path`,
    with model.init_from_hf = path so that build_engine loads its weights. A tokenizer saved in the
    same directory becomes the run's tokenizer."""
    cfg = base if base is not None else load_config(None, list(overrides))
    path = Path(path).resolve()
    model = model_config_from_hf(path, seq_len=cfg.data.seq_len, init_std=cfg.model.init_std)
    cfg.model = model.model_copy(update={"init_from_hf": str(path)})
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        cfg.data.tokenizer, cfg.data.tokenizer_path = "hf", str(path)
    return cfg


# What must agree between the run config and the transformers config for the weights to fit.
_MATCH = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_size", "rope_theta",
          "norm_eps", "tie_embeddings", "attention_bias")


def check_model_matches_hf(m: ModelConfig, path, seq_len: int | None = None) -> None:
    """ConfigError naming the first model.* key that differs from the transformers config in `path`."""
    want = model_config_from_hf(path, seq_len=seq_len)
    for key in _MATCH:
        if getattr(m, key) != getattr(want, key):
            name = {"kv_heads": "num_kv_heads", "ffn_size": "intermediate_size"}.get(key, key)
            raise ConfigError(f"model.{name}", getattr(m, key),
                              f"model.init_from_hf={path} has {getattr(want, key)!r}; make the model section "
                              f"with `python -m resbm_ds.hf config {path}` (or resbm_ds.hf.config_from_hf)")
    if m.max_seq_len > want.max_seq_len:
        raise ConfigError("model.max_seq_len", m.max_seq_len,
                          f"at most {want.max_seq_len} for {path} (max_position_embeddings / sliding_window)")


# ---- out -------------------------------------------------------------------------------------

def family_of(spec: ModelSpec, family: str | None) -> str:
    """The family asked for, else the one the run started from, else Qwen2 (biases) or Llama."""
    src = spec.model.init_from_hf
    if family is None and src and (Path(src) / "config.json").is_file():
        family = load_hf_config(src).model_type
    family = family or ("qwen2" if spec.model.attention_bias else "llama")
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: allowed: {list(FAMILIES)}")
    if spec.model.attention_bias and family != "qwen2":
        raise ValueError(f"q/k/v biases (model.attention_bias) exist only in the qwen2 family, not {family}")
    return family


def hf_config_for(spec: ModelSpec, family: str | None = None, dtype: torch.dtype = torch.float32):
    """The transformers config of our (uncompressed) model: the original one when the run started
    from a transformers directory of the same family (keeping its token ids etc.), else a fresh one."""
    from transformers import AutoConfig, CONFIG_MAPPING

    family = family_of(spec, family)
    m = spec.model
    src = m.init_from_hf
    fresh = not (src and (Path(src) / "config.json").is_file() and load_hf_config(src).model_type == family)
    hf = CONFIG_MAPPING[family]() if fresh else AutoConfig.from_pretrained(src, local_files_only=True)
    fields = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                  num_key_value_heads=m.kv_heads, rms_norm_eps=m.norm_eps, hidden_act="silu",
                  tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})
    if fresh:
        fields["max_position_embeddings"] = m.max_seq_len
        if family == "mistral":   # a fresh Mistral config brings a 4096 window: use full attention
            fields["sliding_window"] = None
    if family in ("llama", "mistral"):
        fields["head_dim"] = m.head_dim
    if family == "llama":
        fields.update(attention_bias=False, mlp_bias=False)
    hf.update(fields)   # PretrainedConfig.update: one setattr per field
    if family == "qwen2" and hf.layer_types is not None:
        missing = max(0, m.num_layers - len(hf.layer_types))
        hf.layer_types = hf.layer_types[:m.num_layers] + ["full_attention"] * missing
    hf.architectures = [type(hf).__name__.replace("Config", "ForCausalLM")]
    hf.dtype = dtype
    check_hf_config(hf, seq_len=m.max_seq_len)   # a run's data.seq_len is at most this
    return hf
