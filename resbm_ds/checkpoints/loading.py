"""Reading checkpoints' weights safely: where a tag's layer files are, and loading them.

A pipeline checkpoint holds one file per layer, named by the layer's global index,
`<checkpoints>/<tag>/layer_XX-model_00-model_states.pt`, whatever the number of stages and
data-parallel replicas (each layer is written once; a tied head writes no file, it is the
embedding). So a model can be read from any checkpoint into any layout, layer by layer. Files are
read with `torch.load(weights_only=True)`: tensors only, no code from the file runs; DeepSpeed's
own loads (--resume) are switched to the same (`load_deepspeed_checkpoints_safely`). Before any
file is read, the tag's files are checked against its manifest (store.py).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from deepspeed.pipe import TiedLayerSpec
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from .. import compat
from ..cli import UserError
from .store import previous_offer

LAYER_FILE = re.compile(r"layer_(\d+)-(.*)model_states\.pt$")


def layer_files(tag_dir: Path) -> dict[int, Path]:
    """Global layer index -> its file. Several files for one layer (model parallelism) are refused."""
    files: dict[int, list[Path]] = {}
    for f in sorted(Path(tag_dir).iterdir()):
        m = LAYER_FILE.match(f.name)
        if m:
            files.setdefault(int(m.group(1)), []).append(f)
    several = {i: [f.name for f in fs] for i, fs in files.items() if len(fs) > 1}
    if several:
        raise ValueError(f"{tag_dir}: several files for one layer (model parallelism is not supported): {several}")
    return {i: fs[0] for i, fs in sorted(files.items())}


class NonFiniteWeights(UserError):
    """A checkpoint with NaN or infinite weights (saved before runs checked their steps)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file that holds more than tensors and plain containers: it is not loaded."""


# Plain-data classes DeepSpeed's ZeRO-1 / bf16 optimizer states hold (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on fp32/bf16 x AdamW/Muon checkpoints): an
# attribute bag, an enum and a dataclass, rebuilt without calling any code of the file's choosing.
DEEPSPEED_STATE_TYPES = (LossScaler, ZeroStageEnum, fragment_address)


def safe_load(path, map_location=None):
    """torch.load with weights_only=True: tensors, numbers, strings, containers and the DeepSpeed
    state types above only. A file that would need to run code to load is refused."""
    try:
        with torch.serialization.safe_globals(list(DEEPSPEED_STATE_TYPES)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"refusing to load {path}: it holds objects other than tensors and plain "
                               f"containers, and loading it would run code ({str(e).splitlines()[0][:200]})") from None


def load_deepspeed_checkpoints_safely(engine) -> None:
    """DeepSpeed's checkpoint engine loads every file (model, optimizer, ZeRO and layer states) with
    torch.load(weights_only=False), which runs whatever code a crafted file carries; make it load
    them with `safe_load` instead."""
    compat.replace_checkpoint_load(engine, safe_load)


def read_layer(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path, map_location="cpu")


def load_layers(layers: dict[int, nn.Module], tag_dir: Path, expected_layers: int,
                use: str = "--tag {tag}") -> torch.dtype | None:
    """Load `layers` (global index -> module; modules without state are skipped) from a tag's files;
    -> the checkpoint's dtype. Strict: every key and shape must match, and every weight be finite
    (else the line offers the previous complete tag, passed as `use` says)."""
    files = layer_files(tag_dir)
    extra = sorted(set(files) - set(range(expected_layers)))
    if extra:
        raise ValueError(f"{tag_dir} has layer files {extra} beyond the {expected_layers} layers of the "
                         "config: the checkpoint was written with a different model/bottleneck config")
    dtype = None
    for i, layer in layers.items():
        if not layer.state_dict():
            continue
        if i not in files:
            raise FileNotFoundError(f"{tag_dir}: no file for layer {i} ({type(layer).__name__})")
        sd = read_layer(files[i])
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteWeights(f"{files[i]} holds non-finite weights ({', '.join(bad[:3])}"
                                   f"{'...' if len(bad) > 3 else ''}); "
                                   f"{previous_offer(tag_dir.parent, tag_dir.name, use)}")
        try:
            layer.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{files[i].name} does not fit layer {i} ({type(layer).__name__}) of this "
                             f"config: {str(e).splitlines()[-1].strip()}") from None
        dtype = dtype or next(iter(sd.values())).dtype
    return dtype


def init_pipeline_from_checkpoint(module, tag_dir: Path, use: str = "--tag {tag}") -> None:
    """train.init_from: this stage's layers (and its copies of tied layers) from a checkpoint of any
    layout. Called before `deepspeed.initialize`, so optimizer master weights start from them."""
    specs, local_start = compat.stage_layer_specs(module)
    local = {local_start + i: f for i, f in enumerate(module.forward_funcs) if isinstance(f, nn.Module)}
    for key, tied in module.tied_modules.items():
        owner = next(i for i, s in enumerate(specs) if isinstance(s, TiedLayerSpec) and s.key == key)
        local.setdefault(owner, tied)
    load_layers(local, tag_dir, len(specs), use)
