"""DeepSpeed compatibility in one room: every patch of DeepSpeed or torch internals, and the list of them.

resbm_ds runs on DeepSpeed's pipeline engine and changes a few of its internals: it wraps the p2p
transport and two collectives (the wire chain), reads the pipeline grid, cuts the stages itself,
keeps the fp32 clip norm, guards the optimizer step, loads checkpoints with weights_only, tags
parameters for DeepSpeed's clip norm and ZeRO-1 Muon, feeds token ids on every stage, hides one
environment variable, and sets one private field of torch's lr scheduler. Each is a small named
function or class below, with what it changes and why; the rest of the package calls these and
never assigns to a DeepSpeed or torch attribute itself (tests/test_layout.py checks that with `ast`).

Upgrading DeepSpeed or torch: `PATCH_POINTS` lists every internal these functions touch (module,
attribute, the parameter names it must still take, or the text its source must still hold), and
tests/test_compat.py, a fast test, checks each against the installed packages. A renamed method or a
changed signature fails there, in one clear line, instead of silently in a training run. The
installed DeepSpeed is also checked against `TESTED_DEEPSPEED` at import (a warning), and
`bottleneck.token_ids=local`, which reads the pipeline engine's schedule internals, refuses an
untested version outright (`require_tested_deepspeed`).

Patches, and who calls them:

  patch_comm / restore_comm       p2p.send/recv, deepspeed.comm.all_reduce/broadcast  (wire/chain.py)
  own_stage / stage_to_global /   p2p._grid and its _topo, read                      (wire/chain.py,
    stages_of_ranks                                                                     wire/link.py)
  PipelineModuleCutAt             PipelineModule._partition_layers / _set_bounds      (model/pipeline.py)
  stage_layer_specs               PipelineModule._layer_specs / _local_start, read     (checkpoints/loading.py)
  load_on_every_stage             PipelineEngine._INSTRUCTION_MAP, set_dataiterator    (model/local_ids.py)
  tag_model_parallel              Parameter.model_parallel (clip_grad_norm_ reads it)  (optim.py)
  tag_use_muon                    Parameter.use_muon (ZeRO-1 reads it)                 (optim.py)
  keep_fp32_clip_norm             engine.clip_fp32_gradients, engine._global_grad_norm (engine.py)
  replace_optimizer_step /        engine.optimizer.step, .overflow,                    (engine.py)
    take_or_skip_step               .check_grad_overflow, .check_overflow
  zero_gradient_partitions        ZeRO-1's averaged_gradients, read                    (engine.py)
  shm_allreduce_off               LOCAL_SIZE hidden from the environment               (engine.py)
  load_comm_op                    torch's extension baton, DeepSpeed's loaded-op cache (engine.py)
  replace_checkpoint_load         engine.checkpoint_engine.load                        (checkpoints/loading.py)
  set_last_lr                     torch LRScheduler._last_lr                           (trainer.py)
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import deepspeed.comm as ds_comm
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import TENSOR_META_SIZE  # noqa: F401  (the shape handshake's length)
from deepspeed.runtime.pipe.schedule import ForwardPass, LoadMicroBatch
from deepspeed.accelerator import get_accelerator
from deepspeed.comm.torch import build_shm_op
from deepspeed.runtime.utils import clip_grad_norm_
from torch.utils.cpp_extension import _get_build_directory

from .system import file_lock

# ---- the version check ------------------------------------------------------------------------
TESTED_DEEPSPEED = ("0.19.",)   # the internals below were read on these versions (pyproject pins 0.19.8)


def deepspeed_version_problem() -> str | None:
    """Why the installed DeepSpeed is not one the patches were read on, or None."""
    if not deepspeed.__version__.startswith(TESTED_DEEPSPEED):
        return (f"reads DeepSpeed's pipeline engine internals, checked on "
                f"{'/'.join(v + 'x' for v in TESTED_DEEPSPEED)}; installed: {deepspeed.__version__}")
    return None


def require_tested_deepspeed(what: str) -> None:
    """Refuse `what` (a feature that reads internals too deep to trust elsewhere) on an untested DeepSpeed."""
    problem = deepspeed_version_problem()
    if problem:
        raise RuntimeError(f"{what} {problem}")


if (_problem := deepspeed_version_problem()) is not None:
    warnings.warn(f"resbm_ds {_problem}: run tests/test_compat.py to see which patches still fit",
                  RuntimeWarning, stacklevel=2)


# ---- the patch points, as data ------------------------------------------------------------------
@dataclass(frozen=True)
class PatchPoint:
    """One DeepSpeed or torch internal that a function here replaces, wraps, sets or reads.

    `module` and `attr` (dotted inside the module) name it. `params`: the parameter names it must
    take (a callable we call, wrap or replace); None: no signature to check. `mentions`: text its
    source must contain (for instance attributes and flags, which have no signature: where DeepSpeed
    or torch sets or reads them)."""
    module: str
    attr: str
    params: tuple[str, ...] | None = None
    mentions: str | None = None
    used_by: str = ""


PATCH_POINTS = (
    # wire/chain.py: the transport every activation and gradient crosses, and the collectives
    PatchPoint("deepspeed.runtime.pipe.p2p", "send", ("tensor", "dest_stage", "async_op"), used_by="patch_comm"),
    PatchPoint("deepspeed.runtime.pipe.p2p", "recv", ("tensor", "src_stage", "async_op"), used_by="patch_comm"),
    PatchPoint("deepspeed.comm", "all_reduce",
               ("tensor", "op", "group", "async_op", "prof", "log_name", "debug"), used_by="patch_comm"),
    PatchPoint("deepspeed.comm", "broadcast",
               ("tensor", "src", "group", "async_op", "prof", "log_name", "debug"), used_by="patch_comm"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine", mentions="p2p.send(",
               used_by="patch_comm (the engine calls p2p through the module attribute)"),
    PatchPoint("deepspeed.runtime.pipe.engine", "TENSOR_META_SIZE", used_by="wire/chain.is_shape_handshake"),
    PatchPoint("deepspeed.runtime.pipe.p2p", "_grid", used_by="own_stage, stage_to_global, stages_of_ranks"),
    PatchPoint("deepspeed.runtime.pipe.p2p", "init_process_groups", ("grid",), mentions="_grid = grid",
               used_by="own_stage, stage_to_global, stages_of_ranks"),
    PatchPoint("deepspeed.runtime.pipe.topology", "PipelineParallelGrid.get_stage_id", ("self",), used_by="own_stage"),
    PatchPoint("deepspeed.runtime.pipe.topology", "PipelineParallelGrid.stage_to_global",
               ("self", "stage_id", "kwargs"), used_by="stage_to_global"),
    PatchPoint("deepspeed.runtime.pipe.topology", "PipelineParallelGrid.__init__", ("self", "topology", "process_group"),
               mentions="self._topo = topology", used_by="stages_of_ranks"),
    PatchPoint("deepspeed.runtime.pipe.topology", "ProcessTopology.get_coord", ("self", "rank"), used_by="stages_of_ranks"),
    # model/pipeline.py: the stage cuts
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule._partition_layers", ("self", "method"),
               used_by="PipelineModuleCutAt"),
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule._set_bounds", ("self", "start", "stop"),
               used_by="PipelineModuleCutAt"),
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule.__init__", mentions="self._partition_layers(method=",
               used_by="PipelineModuleCutAt"),
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule.__init__", mentions="self._topo = topology",
               used_by="PipelineModuleCutAt"),
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule.__init__", mentions="self._layer_specs = list(layers)",
               used_by="stage_layer_specs"),
    PatchPoint("deepspeed.runtime.pipe.module", "PipelineModule._set_bounds", mentions="self._local_start = start",
               used_by="stage_layer_specs"),
    # model/local_ids.py: token ids loaded on every stage
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine._INSTRUCTION_MAP", used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine._exec_schedule",
               mentions="self._INSTRUCTION_MAP[type(cmd)]", used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine._exec_load_micro_batch", ("self", "buffer_id"),
               used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine._exec_forward_pass", ("self", "buffer_id"),
               used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine.set_dataiterator", ("self", "iterator"),
               mentions="self.data_iterator = iterator", used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine.set_batch_fn", ("self", "fn"),
               used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine.is_first_stage", ("self",), used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.engine", "PipelineEngine.is_last_stage", ("self",), used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.schedule", "LoadMicroBatch", used_by="load_on_every_stage"),
    PatchPoint("deepspeed.runtime.pipe.schedule", "ForwardPass", used_by="load_on_every_stage"),
    # optim.py: the parameter tags DeepSpeed reads
    PatchPoint("deepspeed.runtime.utils", "clip_grad_norm_", ("parameters", "max_norm", "norm_type", "mpu"),
               used_by="keep_fp32_clip_norm"),
    PatchPoint("deepspeed.runtime.utils", "is_model_parallel_parameter", ("p",), mentions="p.model_parallel",
               used_by="tag_model_parallel"),
    PatchPoint("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", mentions="use_muon",
               used_by="tag_use_muon"),
    PatchPoint("deepspeed.runtime.zero.muon.muon_optimizer", "MuonWithAuxAdam",
               mentions='group["use_muon"]', used_by="optim.build_optimizer (its param groups)"),
    PatchPoint("deepspeed.runtime.zero.muon.original_muon", "ns_compute_dtype", ("ns_method",),
               used_by="optim.newton_schulz_dtype"),
    # engine.py: the fp32 clip norm, the step guard, LOCAL_SIZE
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine.clip_fp32_gradients", ("self",),
               used_by="keep_fp32_clip_norm"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._take_model_step", ("self", "lr_kwargs"),
               mentions="self.clip_fp32_gradients()", used_by="keep_fp32_clip_norm"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine.get_global_grad_norm", ("self",),
               mentions="return self._global_grad_norm", used_by="keep_fp32_clip_norm"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._take_model_step",
               mentions="self.optimizer.step()", used_by="replace_optimizer_step"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._take_model_step",
               mentions="overflow = self.optimizer.overflow", used_by="take_or_skip_step"),
    PatchPoint("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.step", ("self", "closure"),
               mentions="if self.check_grad_overflow:", used_by="take_or_skip_step"),
    PatchPoint("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.check_overflow",
               ("self", "partition_gradients"), used_by="take_or_skip_step"),
    PatchPoint("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.__init__",
               mentions="self.averaged_gradients = {}", used_by="zero_gradient_partitions"),
    PatchPoint("deepspeed.comm.torch", "TorchBackend", mentions="self.shm_comm_op.initialize(",
               used_by="shm_allreduce_off (csrc/cpu/comm/shm_interface.cpp reads LOCAL_SIZE there)"),
    PatchPoint("deepspeed.comm.torch", "TorchBackend.__init__", mentions="self.shm_comm_op = build_shm_op()",
               used_by="load_comm_op"),
    PatchPoint("deepspeed.comm.torch", "build_shm_op", (), mentions="builder.load()", used_by="load_comm_op"),
    PatchPoint("deepspeed.ops.op_builder.builder", "OpBuilder.jit_load", ("self", "verbose"),
               mentions="__class__._loaded_ops[self.name] = op_module", used_by="load_comm_op"),
    PatchPoint("torch.utils.cpp_extension", "_jit_compile", mentions="FileBaton(os.path.join(build_directory, 'lock'))",
               used_by="load_comm_op"),
    PatchPoint("torch.utils.cpp_extension", "_get_build_directory", ("name", "verbose"), used_by="load_comm_op"),
    # checkpoints/loading.py: the checkpoint loader
    PatchPoint("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine", "TorchCheckpointEngine.load",
               ("self", "path", "map_location"), used_by="replace_checkpoint_load"),
    PatchPoint("deepspeed.runtime.engine", "DeepSpeedEngine._load_checkpoint",
               mentions="self.checkpoint_engine.load(", used_by="replace_checkpoint_load"),
    # trainer.py: torch's lr scheduler
    PatchPoint("torch.optim.lr_scheduler", "LRScheduler.get_last_lr", ("self",), mentions="return self._last_lr",
               used_by="set_last_lr"),
)

# Attribute names of DeepSpeed or torch objects that the functions here assign (or override, or read
# although private). tests/test_layout.py fails on any module but this one that assigns to an
# attribute of these names, or touches one of the private ones at all.
PATCHED_ATTRIBUTES = frozenset({
    "send", "recv", "all_reduce", "broadcast",                     # p2p, deepspeed.comm
    "_grid", "_topo",                                              # the pipeline grid
    "_partition_layers", "_set_bounds", "parts",                   # PipelineModule
    "_layer_specs", "_local_start",
    "_INSTRUCTION_MAP", "set_dataiterator", "training_dataloader", "data_iterator",   # PipelineEngine
    "model_parallel", "use_muon",                                  # parameter tags
    "clip_fp32_gradients", "_global_grad_norm",                    # DeepSpeedEngine
    "step", "overflow", "check_grad_overflow", "check_overflow", "averaged_gradients",   # its optimizer
    "checkpoint_engine", "load",                                   # its checkpoint engine
    "_last_lr",                                                    # torch's LRScheduler
    "_get_build_directory",                                        # torch's cpp_extension, read
})
PRIVATE_ATTRIBUTES = frozenset(n for n in PATCHED_ATTRIBUTES if n.startswith("_"))
PATCHED_ENVIRONMENT = frozenset({"LOCAL_SIZE"})                # shm_allreduce_off


def resolve(point: PatchPoint):
    """The object `point` names in the installed packages (AttributeError/ImportError if gone)."""
    obj = importlib.import_module(point.module)
    for part in point.attr.split("."):
        obj = getattr(obj, part)
    return obj


def signature_target(obj):
    """The function whose signature counts: deepspeed.comm wraps its collectives in `timed_op`,
    whose wrapper takes (*args, **kwargs) and holds the real function in its closure."""
    if getattr(obj, "__name__", "") == "log_wrapper" and obj.__closure__:
        inner = [c.cell_contents for c in obj.__closure__ if inspect.isfunction(c.cell_contents)]
        if len(inner) == 1:
            return inner[0]
    return obj


def check(point: PatchPoint) -> str | None:
    """What no longer fits in `point` on the installed packages, or None."""
    where = f"{point.module}.{point.attr} (used by {point.used_by})"
    try:
        obj = resolve(point)
    except (ImportError, AttributeError) as e:
        return f"{where} is gone: {e}"
    if point.params is not None:
        try:
            got = tuple(inspect.signature(signature_target(obj)).parameters)
        except (TypeError, ValueError) as e:
            return f"{where} has no signature: {e}"
        if got != point.params:
            return f"{where} takes {got}, expected {point.params}"
    if point.mentions is not None:
        source = inspect.getsource(obj)
        if point.mentions not in source:
            return f"{where} no longer contains {point.mentions!r}"
    return None


# ---- wire/chain.py: the transport and the collectives -------------------------------------------
def patch_comm(send, recv, all_reduce, broadcast) -> tuple:
    """Replace `p2p.send/recv` and `deepspeed.comm.all_reduce/broadcast` by the given functions; ->
    DeepSpeed's own, for `restore_comm`. The pipeline engine calls each through its module attribute
    (`p2p.send(...)`, `dist.all_reduce(...)`), so every activation, activation gradient and
    collective between stages passes through the replacements (the wire chain's hooks)."""
    originals = (p2p.send, p2p.recv, ds_comm.all_reduce, ds_comm.broadcast)
    p2p.send, p2p.recv = send, recv
    ds_comm.all_reduce, ds_comm.broadcast = all_reduce, broadcast
    return originals


def restore_comm(originals: tuple) -> None:
    """Put back the functions `patch_comm` returned."""
    p2p.send, p2p.recv, ds_comm.all_reduce, ds_comm.broadcast = originals


def own_stage() -> int:
    """This rank's pipeline stage, from the grid the engine gave p2p (private `p2p._grid`)."""
    return p2p._grid.get_stage_id()


def stage_to_global(stage: int) -> int:
    """The global rank of `stage` in this rank's pipeline (private `p2p._grid`)."""
    return p2p._grid.stage_to_global(stage_id=stage)


def stages_of_ranks(ranks) -> set[int] | None:
    """The pipeline stages `ranks` sit on (private `p2p._grid._topo`); None before an engine has
    given p2p its grid (the engine's own set-up), when there is no stage layout to judge by yet."""
    grid = getattr(p2p, "_grid", None)
    if grid is None:
        return None
    return {grid._topo.get_coord(r).pipe for r in ranks}


# ---- model/pipeline.py and checkpoints/loading.py: the stage cuts and the layers of a stage ------
class PipelineModuleCutAt(PipelineModule):
    """A `PipelineModule` cut where `stage_parts()` says. DeepSpeed's partition methods (uniform,
    parameters, type:) cannot express "cut after the encoder"; its private `_partition_layers` is
    the hook DeepSpeed's own DualPipeVModule overrides too. Subclasses define `stage_parts()`: the
    layer index where each stage starts, plus the total at the end (DeepSpeed's `parts`)."""

    def stage_parts(self) -> list[int]:
        raise NotImplementedError

    def _partition_layers(self, method="resbm"):
        self.parts = self.stage_parts()
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])


def stage_layer_specs(module: PipelineModule) -> tuple[list, int]:
    """Every layer spec of the model (private `_layer_specs`), and the global index of this stage's
    first layer (private `_local_start`)."""
    return module._layer_specs, module._local_start


# ---- model/local_ids.py: every stage loads its micro-batches --------------------------------------
def load_on_every_stage(engine, batch_fn, after_load, before_forward) -> None:
    """Make `engine` (a PipelineEngine of any stage) load each micro-batch on every stage:

      * keep the data iterator on middle stages too (`set_dataiterator` keeps it only on the first
        and last);
      * pass every batch drawn through `batch_fn` (DeepSpeed's public `set_batch_fn`);
      * at each LoadMicroBatch, after DeepSpeed's own load, call `after_load(buffer_id, device)`;
      * at each ForwardPass, load first on middle stages (the schedule loads on the first and last
        stage only), then call `before_forward(buffer_id)`, then run DeepSpeed's forward.

    `_exec_schedule` looks instructions up in `_INSTRUCTION_MAP` on the instance, so an instance copy
    of the map patches this one engine. Call `require_tested_deepspeed` first."""
    middle = not (engine.is_first_stage() or engine.is_last_stage())
    load, forward = engine._INSTRUCTION_MAP[LoadMicroBatch], engine._INSTRUCTION_MAP[ForwardPass]

    def set_dataiterator(iterator):        # the engine's own keeps it on the first and last stage only
        engine.training_dataloader = None
        engine.data_iterator = iterator

    def load_micro_batch(self, buffer_id):
        load(self, buffer_id)              # DeepSpeed's: inputs (first stage), labels (last stage)
        after_load(buffer_id, self.device)

    def forward_pass(self, buffer_id):
        if middle:
            load_micro_batch(self, buffer_id)
        before_forward(buffer_id)
        return forward(self, buffer_id)

    engine.set_dataiterator = set_dataiterator
    engine.set_batch_fn(batch_fn)
    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, LoadMicroBatch: load_micro_batch, ForwardPass: forward_pass}


# ---- optim.py: the parameter tags DeepSpeed reads ------------------------------------------------
def tag_model_parallel(params) -> None:
    """Set `p.model_parallel` on each parameter: True unless it is a tied weight's copy on a later
    stage (`ds_pipe_replicated`). `deepspeed.runtime.utils.clip_grad_norm_` counts a parameter on
    stages other than 0 only when so tagged (optim.count_every_stage_in_clip_norm says why)."""
    for p in params:
        p.model_parallel = not getattr(p, "ds_pipe_replicated", False)


def tag_use_muon(params, muon_ids: set[int]) -> None:
    """Set `p.use_muon` on each parameter: whether Muon updates it (its id in `muon_ids`).
    DeepSpeed's ZeRO-1 reads the tag on every parameter to route Muon's gradients."""
    for p in params:
        p.use_muon = id(p) in muon_ids


# ---- engine.py: the clip norm, the step guard, LOCAL_SIZE ----------------------------------------
def keep_fp32_clip_norm(engine) -> None:
    """DeepSpeed's fp32 ZeRO-0 path clips the gradients but drops their norm (its bf16 and ZeRO paths
    keep it in `_global_grad_norm`); replace `engine.clip_fp32_gradients` by the same clip that keeps
    it there too, so `get_global_grad_norm()` always reports. No-op where DeepSpeed keeps it already
    or does not clip."""
    if engine.bfloat16_enabled() or engine.zero_optimization() or engine.gradient_clipping() <= 0:
        return

    def clip_and_keep():
        engine._global_grad_norm = float(clip_grad_norm_(parameters=engine.module.parameters(),
                                                         max_norm=engine.gradient_clipping(), mpu=engine.mpu))
    engine.clip_fp32_gradients = clip_and_keep


def replace_optimizer_step(engine, step):
    """Make `engine.optimizer.step` call `step` instead; -> the optimizer's own step (bound)."""
    original = engine.optimizer.step
    engine.optimizer.step = step
    return original


def take_or_skip_step(opt, step, skip: bool, zero: bool, *args, **kwargs):
    """Run the optimizer's own `step` (from `replace_optimizer_step`), or skip it the way DeepSpeed
    skips an overflowed step, so the engine counts it in `skipped_steps` and leaves the lr schedule:

      * ZeRO-0: set `opt.overflow`, which the engine's `_take_model_step` reads after the step
        (False: applied; True: skipped, and `step` is not called);
      * ZeRO-1: call its step with `check_grad_overflow` on and `check_overflow` finding an overflow,
        so it clears its gradient partitions as it does on an overflow; both are restored after."""
    if not skip:
        if not zero:
            opt.overflow = False
        return step(*args, **kwargs)
    if not zero:
        opt.overflow = True
        return None
    checking = opt.check_grad_overflow
    opt.check_grad_overflow = True
    opt.check_overflow = lambda *a, **k: setattr(opt, "overflow", True)
    try:
        return step(*args, **kwargs)
    finally:
        del opt.check_overflow
        opt.check_grad_overflow = checking


def zero_gradient_partitions(opt) -> list:
    """ZeRO-1's partition of the reduced gradients held by this rank (its `averaged_gradients`)."""
    parts = [v for v in opt.averaged_gradients.values() if v is not None]
    return [g for v in parts for g in (v if isinstance(v, (list, tuple)) else [v])]


@contextlib.contextmanager
def shm_allreduce_off(backend: str):
    """On CPU, DeepSpeed's comm backend sets up its shared-memory all-reduce when LOCAL_SIZE (set by
    the `deepspeed` launcher) equals the world size: each rank creates a 69 MB
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> that nothing ever unlinks
    (csrc/cpu/comm/shm.cpp), so every deepspeed-launched run left them behind. Only its
    inference_all_reduce uses it; training goes through torch.distributed over gloo. So hide
    LOCAL_SIZE while the backend initialises, and the buffers are never created."""
    saved = os.environ.pop("LOCAL_SIZE", None) if backend == "gloo" else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ["LOCAL_SIZE"] = saved


def load_comm_op() -> None:
    """Load DeepSpeed's CPU comm op so that a rank killed while loading it cannot hang later runs.

    DeepSpeed's comm backend JIT-loads the op through torch.utils.cpp_extension, which on every load,
    built or not, holds a presence-file baton (`lock` in the op's build directory) while a no-op ninja
    runs. A process killed inside that second (a preempted rank, a launcher's SIGKILL) leaves the file,
    and every later load from that TORCH_EXTENSIONS_DIR waits for it forever (FileBaton.wait). Here the
    load runs first, under an flock the kernel drops when its holder dies: under it a baton left in the
    directory is one a dead process left, and is removed. DeepSpeed's own call then returns the loaded
    module from its cache (OpBuilder._loaded_ops). Call before deepspeed.init_distributed."""
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with file_lock(build_dir / "resbm_load.flock"):
        baton = build_dir / "lock"
        if baton.exists():
            warnings.warn(f"removed {baton}, left by a process killed while it loaded DeepSpeed's comm op")
            baton.unlink(missing_ok=True)
        build_shm_op()


# ---- checkpoints/loading.py: the checkpoint loader ---------------------------------------------
def replace_checkpoint_load(engine, load) -> None:
    """Make DeepSpeed's checkpoint engine load every file (model, optimizer, ZeRO and layer states)
    with `load(path, map_location=None)` instead of its torch.load(weights_only=False)."""
    engine.checkpoint_engine.load = load


# ---- trainer.py: torch's lr scheduler --------------------------------------------------------------
def set_last_lr(sched) -> None:
    """Make `sched.get_last_lr()` report the optimizer's current lrs (torch keeps them in the private
    `_last_lr`, refreshed only by `step()`), after the caller set the groups' lr by hand."""
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
