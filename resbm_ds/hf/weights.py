"""transformers weights <-> our layers, by name: in per pipeline stage or for one process, and out
as a `save_pretrained` directory (see the package docstring)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..cli import ConfigError, UserError
from ..config import Config, ModelConfig, ModelSpec
from ..model.causal_lm import ResBMForCausalLM
from ..model.layers import FinalNorm, LMHead, TokenEmbedding, TransformerBlock
from .configs import family_of, config_from_hf, hf_config_for
from .modeling import ResBMHFForCausalLM

def hf_names(layer: nn.Module) -> dict[str, str]:
    """Our state_dict key -> transformers key for one pipeline layer ({} for ResBM boundary layers)."""
    if isinstance(layer, TokenEmbedding):
        return {"weight": "model.embed_tokens.weight"}
    if isinstance(layer, TransformerBlock):
        return {k: f"model.layers.{layer.layer_id}.{k}" for k in layer.state_dict()}
    if isinstance(layer, FinalNorm):
        return {"weight": "model.norm.weight"}
    if isinstance(layer, LMHead):
        return {"lm_head.weight": "lm_head.weight"}
    return {}


class SafetensorsDir:
    """The tensors of a save_pretrained directory, sharded or not, read by name on demand (mmap):
    a stage that asks for its own layers reads nothing else."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                self.where = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        elif single.is_file():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(single), framework="pt") as f:
                    self.where = {k: single.name for k in f.keys()}
            except (SafetensorError, OSError) as e:
                raise UserError(f"{single}: not a readable safetensors file ({e})") from None
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json "
                                    "(only safetensors checkpoints are read; save_pretrained writes them)")

    def get(self, names) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise KeyError(f"{self.path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out


def check_hf_weights(m: ModelConfig, path) -> None:
    """Before any process starts: every safetensors file of `path` is readable (its header parses and
    covers the file: a truncated or garbage file fails here) and holds the tensors of the model `m`,
    with the embedding's shape. UserError names the file and what is wrong."""
    from safetensors import SafetensorError, safe_open

    weights = SafetensorsDir(path)
    shapes = {}
    for file in sorted(set(weights.where.values())):
        try:
            with safe_open(str(weights.path / file), framework="pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise UserError(f"{weights.path / file}: not a readable safetensors file ({e})") from None
    need = ["model.embed_tokens.weight", "model.norm.weight", *([] if m.tie_embeddings else ["lm_head.weight"])]
    need += [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(m.num_layers)]
    missing = [n for n in need if n not in shapes]
    if missing:
        raise UserError(f"{weights.path}: the weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                        f"(found {len(shapes)} tensors); expected a complete {m.num_layers}-layer model")
    embed = list(shapes["model.embed_tokens.weight"])
    if embed != [m.vocab_size, m.hidden_size]:
        raise UserError(f"{weights.path}: model.embed_tokens.weight has shape {embed}, config.json says "
                        f"[{m.vocab_size}, {m.hidden_size}]")


def load_hf_weights(layers, path) -> list[str]:
    """Copy transformers weights from `path` into the given layers (any subset of the model; each
    layer reads only its own tensors). Returns the transformers names that were read."""
    layers = list({id(l): l for l in layers if isinstance(l, nn.Module) and hf_names(l)}.values())
    wanted = sorted({hf for l in layers for hf in hf_names(l).values()})
    tensors = SafetensorsDir(path).get(wanted)
    for layer in layers:
        # strict: every parameter of a mapped layer is loaded, and shapes are checked by name
        layer.load_state_dict({ours: tensors[hf] for ours, hf in hf_names(layer).items()})
    return wanted


def init_pipeline_from_hf(module, spec: ModelSpec) -> None:
    """build_engine's hook: with model.init_from_hf set, load this stage's layers from it.

    A tied LM head on the last stage is a second copy of the embedding (DeepSpeed keeps tied copies
    in `tied_modules` and syncs them only at construction), so it is loaded here as well."""
    path = spec.model.init_from_hf
    if not path:
        return
    local = [f for f in module.forward_funcs if isinstance(f, nn.Module)] + list(module.tied_modules.values())
    load_hf_weights(local, path)


def from_hf(path, base: Config | None = None, overrides=()):
    """The network of a transformers directory on one process: (ResBMForCausalLM, Config). With
    bottleneck.method=none it computes the transformers model's logits."""
    cfg = config_from_hf(path, base, overrides)
    model = ResBMForCausalLM(cfg.spec)
    load_hf_weights(model.layers, path)
    return model, cfg


# ---- out -------------------------------------------------------------------------------------

def hf_state_dict(model, family: str) -> dict[str, torch.Tensor]:
    sd = {}
    for layer in model.layers:
        own = layer.state_dict()
        sd.update({hf: own[ours].detach().contiguous() for ours, hf in hf_names(layer).items()})
    if family == "qwen2":   # Qwen2 always has q/k/v biases: zeros compute the same as none
        for layer in model.layers:
            if isinstance(layer, TransformerBlock) and layer.self_attn.q_proj.bias is None:
                for p in ("q_proj", "k_proj", "v_proj"):
                    w = sd[f"model.layers.{layer.layer_id}.self_attn.{p}.weight"]
                    sd[f"model.layers.{layer.layer_id}.self_attn.{p}.bias"] = w.new_zeros(w.shape[0])
    return sd


def is_plain_transformer(model: ResBMForCausalLM) -> bool:
    """True when every layer is a plain Llama layer (no boundary, token table or baseline layer):
    the model is then a transformers Llama / Qwen2 / Mistral."""
    plain = (TokenEmbedding, TransformerBlock, FinalNorm, LMHead)
    return all(type(layer) in plain or i == model.tied_head for i, layer in enumerate(model.layers))


def save_hf(model: ResBMForCausalLM, out_dir, family: str | None = None, eos_token_id: int | None = None) -> Path:
    """Write a consolidated model as a transformers `save_pretrained` directory that
    `AutoModelForCausalLM.from_pretrained` loads: a plain Llama / Qwen2 / Mistral when the model
    is uncompressed, else a `resbm` model (hf/modeling.py; `import resbm_ds.hf` registers it)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if not is_plain_transformer(model):
        if family is not None:
            raise ConfigError("--family", family, f"only uncompressed models take a family: this model "
                              f"(bottleneck.method={model.spec.bottleneck.method}) exports as model_type 'resbm'")
        hf_model = ResBMHFForCausalLM.from_resbm(model)
        if eos_token_id is not None:
            hf_model.config.eos_token_id = hf_model.generation_config.eos_token_id = eos_token_id
        hf_model.save_pretrained(str(out))
        return out
    family = family_of(model.spec, family)
    dtype = next(model.parameters()).dtype
    hf = hf_config_for(model.spec, family, dtype)
    if eos_token_id is not None:
        hf.eos_token_id = eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    save_file(hf_state_dict(model, family), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
