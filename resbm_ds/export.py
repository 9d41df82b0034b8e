"""Consolidate a pipeline checkpoint into one single-process model: `ResBMForCausalLM` + its config.

A DeepSpeed pipeline checkpoint holds one file per layer, named by the layer's *global* index
(checkpoints/loading.py). `ResBMForCausalLM` holds the same layers, built from the same `layer_specs`, in the
same order, so file XX is `layers.XX` and consolidating is a loop over files. It is a plain
`nn.Module`: no DeepSpeed engine or process group is needed to load or run it.

`ResBMForCausalLM` (model/causal_lm.py) is the pipeline's single-process twin.
An exported model is a directory: `model.safetensors` (keys `layers.XX.*`), `config.yaml` (the
run's Config, whose `ModelSpec` builds the model and whose data settings are `generate`'s defaults)
and `tokenizer/` (the run's tokenizer, also in transformers format), loadable with `load_model(dir)`.
The transformers export (`--hf`) keeps only the `ModelSpec`.

    python -m resbm_ds.export RUN_DIR [--tag step200] [--out DIR] [--hf HF_DIR]

RUN_DIR is a training run (`config.yaml`, `checkpoints/`, `tokenizer/`); the default tag is the
one in `checkpoints/latest`, the default output `RUN_DIR/export/<tag>`. `--hf` also writes a
transformers `save_pretrained` directory with the run's tokenizer in transformers format: a plain
Llama / Qwen2 / Mistral for an uncompressed model, else model_type `resbm` (`import resbm_ds.hf`
registers it; hf/modeling.py). RUN_DIR may also be an exported directory, to re-export it.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .checkpoints.loading import load_layers
from .checkpoints.store import checkpoint_dir, out_of_space
from .cli import ArgumentParser, UserError, cli, existing_file, output_dir
from .config import Config, ModelSpec, load_config, read_yaml
from .data.tokenizer import load_saved_tokenizer, save_transformers_tokenizer
from .hf.weights import is_plain_transformer, save_hf
from .model.causal_lm import ResBMForCausalLM

MODEL_FILE, CONFIG_FILE, TOKENIZER_DIR = "model.safetensors", "config.yaml", "tokenizer"


# ---- from a pipeline checkpoint --------------------------------------------------------------

def run_config(path) -> Config:
    """The Config saved next to a checkpoint: RUN/config.yaml, looked for upwards from `path`."""
    p = Path(path).resolve()
    for d in (p, *p.parents[:3]):
        if (d / CONFIG_FILE).is_file():
            return load_config(str(d / CONFIG_FILE))
    raise FileNotFoundError(f"no {CONFIG_FILE} in {p} or its parents; pass the run config (--config)")


def consolidate(path, tag: str | None = None, cfg: Config | None = None) -> ResBMForCausalLM:
    """One ResBMForCausalLM from a pipeline checkpoint of any stage / data-parallel layout."""
    ckpt = checkpoint_dir(path, tag)
    model = trained_model(cfg or run_config(ckpt))
    dtype = load_layers(dict(enumerate(model.layers)), ckpt, len(model.layers))
    return model.to(dtype)   # the dtype the run trained in (bf16 weights stay bf16)


# ---- the exported format ---------------------------------------------------------------------

def save_model(model: ResBMForCausalLM, out_dir, tokenizer_from=None) -> Path:
    """Write model.safetensors + config.yaml (+ the tokenizer directory `tokenizer_from`, with its
    transformers form beside it). All of it goes into a temporary directory beside `out_dir`, renamed
    into place when complete (replacing an earlier export there): a failed export leaves no partial
    directory and an earlier one intact."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not is_exported(out) and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an export (it would be replaced); choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)
        save_file(sd, str(tmp / MODEL_FILE), metadata={"format": "pt", "class": "ResBMForCausalLM"})
        saved = model.trained_with.to_dict() if model.trained_with is not None else model.spec.to_dict()
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
        if tokenizer_from is not None and Path(tokenizer_from).is_dir():
            shutil.copytree(tokenizer_from, tmp / TOKENIZER_DIR)
            save_transformers_tokenizer(load_saved_tokenizer(tmp / TOKENIZER_DIR), tmp / TOKENIZER_DIR)
        old = out.with_name(f"{tmp.name}.old") if out.exists() else None
        if old:
            out.rename(old)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = out_of_space(out.parent, e) if isinstance(e, Exception) else None   # safetensors: its own error
        if full:
            raise UserError(f"exporting to {out} failed ({full}; the model alone takes "
                            f"{sum(t.numel() * t.element_size() for t in sd.values()):,} bytes); nothing was "
                            "left behind") from None
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return out


def is_exported(path) -> bool:
    return (Path(path) / MODEL_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file()


def load_model(path, tag: str | None = None) -> ResBMForCausalLM:
    """An exported directory, or (consolidated on the fly) a run / checkpoint directory."""
    if not is_exported(path):
        return consolidate(path, tag)
    from safetensors.torch import load_file

    model = model_from_config_file(Path(path) / CONFIG_FILE)
    sd = load_file(str(Path(path) / MODEL_FILE))
    model.to(next(iter(sd.values())).dtype).load_state_dict(sd)
    return model


def model_from_config_file(path: Path) -> ResBMForCausalLM:
    """A fresh model from an export's config.yaml: a run's whole Config (then `trained_with`), or a
    ModelSpec alone (a model saved without its run)."""
    raw = read_yaml(path, "--config", str(path))
    if isinstance(raw, dict) and raw and set(raw) <= set(ModelSpec.model_fields):
        return ResBMForCausalLM(ModelSpec.from_dict(raw))
    return trained_model(load_config(str(path)))


def trained_model(cfg: Config) -> ResBMForCausalLM:
    """A fresh model of a run's config, which it keeps as `trained_with`."""
    model = ResBMForCausalLM(cfg.spec)
    model.trained_with = cfg
    return model


def tokenizer_dir(path) -> Path | None:
    """Where the tokenizer of a run / export lives: `<dir>/tokenizer`, looked for upwards."""
    p = Path(path).resolve()
    for d in (p, *p.parents[:3]):
        if (d / TOKENIZER_DIR).is_dir():
            return d / TOKENIZER_DIR
    return None


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m resbm_ds.export",
                                 description="consolidate a pipeline checkpoint into one model file")
    ap.add_argument("run_dir", help="run directory, checkpoints directory, tag directory or an export")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    ap.add_argument("--config", type=existing_file, default=None, help="run config (default: config.yaml of the run)")
    ap.add_argument("--out", type=output_dir, default=None, help="output directory (default: RUN_DIR/export/<tag>)")
    ap.add_argument("--hf", type=output_dir, default=None, help="also write a transformers save_pretrained directory here")
    ap.add_argument("--family", default=None, choices=["llama", "qwen2", "mistral"],
                    help="transformers family for --hf (default: the one the run started from, else llama)")
    return export(ap.parse_args(argv))


def export(args) -> int:
    if is_exported(args.run_dir):
        model, out = load_model(args.run_dir), None
    else:
        ckpt = checkpoint_dir(args.run_dir, args.tag)
        model = consolidate(ckpt, cfg=load_config(args.config) if args.config else None)
        run = Path(args.run_dir)
        default = (run if (run / "checkpoints").is_dir() else ckpt.parent.parent) / "export" / ckpt.name
        out = save_model(model, args.out or default, tokenizer_from=tokenizer_dir(ckpt))
        print(f"[export] {ckpt} -> {out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{model.dtype})")
    if args.hf:
        tok_dir = tokenizer_dir(args.run_dir)
        tok = load_saved_tokenizer(tok_dir) if tok_dir is not None else None
        hf = save_hf(model, args.hf, args.family, eos_token_id=tok.eos_id if tok else None)
        if tok is not None:   # AutoTokenizer.from_pretrained(HF_DIR) loads the run's tokenizer
            save_transformers_tokenizer(tok, hf)
        kind = "resbm" if not is_plain_transformer(model) else "plain transformers"
        print(f"[export] transformers ({kind}) -> {hf}"
              + ("" if tok else " (no tokenizer: none found beside the run)"))
    elif out is None:
        print("[export] nothing to do: the input is already an export (use --hf to write transformers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
