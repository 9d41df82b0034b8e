"""A launch plan -> process group -> ResBM pipeline -> DeepSpeed pipeline engine, with the wire chain on its p2p."""
from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from . import compat
from .checkpoints.loading import init_pipeline_from_checkpoint, load_deepspeed_checkpoints_safely
from .checkpoints.store import checkpoint_dir
from .cli import UserError
from .hf.weights import init_pipeline_from_hf
from .launch import INIT_FROM_USE, LaunchPlan, deepspeed_config, map_slurm_env, world_size_from_env
from .model import local_ids
from .model.pipeline import ResBMPipeline
from .optim import build_optimizer
from .wire import chain
from .wire.codecs import WireCodec, straight_through
from .wire.link import LinkEmulator
from .wire.meter import WireMeter


class PortInUse(UserError):
    """The rendezvous port is taken: rank 0 cannot host the process group's store."""


def init_distributed(timeout_s: int):
    """Join the process group (gloo on CPU, nccl on GPUs). A single process needs no launcher.

    `timeout_s` (runtime.dist_timeout_s) bounds the rendezvous and every
    collective, so a rank that never arrives ends the job instead of hanging it.
    """
    map_slurm_env()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        compat.load_comm_op()
        with compat.shm_allreduce_off(backend):   # no leaked /dev/shm buffers (compat.py says why)
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, OSError, ImportError) as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise PortInUse(f"the rendezvous port MASTER_PORT={os.environ['MASTER_PORT']} on "
                            f"{os.environ['MASTER_ADDR']} is in use (another run or program holds it): pass a free "
                            "one (deepspeed/torchrun --master_port, or MASTER_PORT)") from None
        if "extension" not in str(e).lower() and "ninja" not in str(e).lower():
            raise
        raise RuntimeError(   # DeepSpeed JIT-builds its CPU comm op on first start
            f"DeepSpeed could not build its CPU comm op in TORCH_EXTENSIONS_DIR="
            f"{os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache/torch_extensions')} ({str(e).splitlines()[0]}); "
            "build it once where a compiler is available (a login node), with the same TORCH_EXTENSIONS_DIR: "
            "bash launchers/setup.sh --prefetch") from None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def close_distributed(barrier: bool = True):
    """Leave the process group before the interpreter exits. Without it, gloo's worker threads are
    still joinable when their C++ destructors run at exit, and a rank can die with SIGABRT
    ("terminate called without an active exception") after a run that succeeded. The barrier
    (skipped on error paths, where a peer may be gone) keeps one rank from tearing down while
    another still sends to it."""
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


@dataclass
class Runtime:
    """What the training loop needs: the engine, where this rank sits, and the wire chain's hooks."""
    engine: "deepspeed.PipelineEngine"
    module: ResBMPipeline
    stage: int
    num_stages: int
    dp_rank: int
    dp_size: int
    meter: WireMeter
    link: LinkEmulator
    sync: typing.Any = None    # sync.SiteSync across sites, set by the trainer (None: one site)


def comm_device() -> torch.device:
    """Where a tensor for a collective lives: the rank's GPU under nccl, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_ranks_agree(bad: bool) -> bool:
    """True on every rank when `bad` is true on any (one float all-reduce over the whole world)."""
    if dist.get_world_size() == 1:
        return bad
    flag = torch.tensor([float(bad)], dtype=torch.float64, device=comm_device())
    deepspeed.comm.all_reduce(flag)
    return bool(flag.item() > 0)


def finite_weights(module) -> bool:
    """Whether every rank's parameters are finite (each rank checks its own stage)."""
    return not all_ranks_agree(not all(torch.isfinite(p).all() for p in module.parameters()))


class StepGuard:
    """Every step's gradients are checked on every rank before the optimizer steps. When any rank's
    are not finite, no rank applies the step: the weights and the optimizer state stay as they were,
    and DeepSpeed counts the step as skipped (`engine.skipped_steps`) and leaves the lr schedule
    where it was, as it does for an fp16 overflow. Each stage must agree (a stage that stepped alone
    would leave the pipeline's halves from different models), hence one float64 all-reduce over the
    whole world of the gradients' sum of squares, in which NaN and inf propagate.

    After each step: `skipped` and `norm`, the global pre-clip gradient norm (a tied embedding's
    gradient, held by two stages, counts twice)."""

    def __init__(self, engine):
        self.engine, self.skipped, self.norm = engine, False, None
        self.zero = bool(engine.zero_optimization())
        self._step = compat.replace_optimizer_step(engine, self._checked_step)

    def _grads(self) -> list:
        if self.zero:   # ZeRO-1: this rank's partition of the reduced gradients (disjoint across ranks)
            return compat.zero_gradient_partitions(self.engine.optimizer)
        return [p.grad for p in self.engine.module.parameters() if p.grad is not None]

    def _checked_step(self, *args, **kwargs):
        sq = torch.zeros(1, dtype=torch.float64, device=comm_device())
        for g in self._grads():
            sq += torch.linalg.vector_norm(g.detach(), dtype=torch.float64).square().to(sq.device)
        if dist.get_world_size() > 1:
            deepspeed.comm.all_reduce(sq)
            if not self.zero:   # ZeRO-0: data-parallel replicas hold the same reduced gradients
                sq /= self.engine.dp_world_size
        self.norm = float(sq.sqrt())
        self.skipped = not torch.isfinite(sq).item()
        # applied, or skipped the way DeepSpeed skips an overflowed step (compat.take_or_skip_step)
        return compat.take_or_skip_step(self.engine.optimizer, self._step, self.skipped, self.zero,
                                        *args, **kwargs)


def codec_inside_stages(module: torch.nn.Module, cfg) -> int:
    """Give every encoder whose boundary crosses no stage the wire codec's round trip (wire.codec,
    and its gradient with wire.codec_backward): the p2p codec quantises only what crosses, so without
    this a boundary inside a stage (every boundary of a 1-process run) would skip the codec and the
    same config would train a different model on another number of stages. Stage s ends after
    boundary (s + 1) * segments / stages - 1 (pipeline.stage_parts). Returns how many it set."""
    if cfg.wire.codec == "none":
        return 0
    per_stage = cfg.bottleneck.segments // cfg.pipeline.stages
    inside = [m for m in module.modules()
              if hasattr(m, "codec_roundtrip") and (m.boundary + 1) % per_stage != 0]
    for m in inside:
        m.codec_roundtrip = straight_through(cfg.wire.codec, cfg.wire.codec_backward)
    return len(inside)


def build_engine(plan: LaunchPlan, extra_ds: dict | None = None, lr_scheduler=None) -> Runtime:
    """Join the process group, build this rank's slice of the model, its wire chain and its engine.

    `plan` comes from `launch.check_config` or `launch.plan_launch`. `lr_scheduler`: a callable
    optimizer -> scheduler; DeepSpeed steps it once per `train_batch` and keeps its state in checkpoints.
    """
    world = world_size_from_env()
    if not isinstance(plan, LaunchPlan) or plan.world_size != world:
        raise TypeError(f"build_engine takes a LaunchPlan for {world} processes "
                        f"(launch.check_config(cfg, {world})), not {type(plan).__name__}")
    cfg = plan.cfg
    init_distributed(cfg.runtime.dist_timeout_s)
    S = cfg.pipeline.stages
    dp = world // S
    topology = PipeModelDataParallelTopology(num_pp=S, num_mp=1, num_dp=dp)
    module = ResBMPipeline(cfg.spec, topology)
    init_pipeline_from_hf(module, cfg.spec)   # model.init_from_hf: this stage's transformers weights
    if cfg.train.init_from:              # weights of another run, any layout (before the optimizer copies them)
        tag_dir = checkpoint_dir(cfg.train.init_from, use=INIT_FROM_USE)
        init_pipeline_from_checkpoint(module, tag_dir, use=INIT_FROM_USE)
    # codec first, so the meter counts and the link times the encoded bytes (wire/chain.py)
    meter, link = WireMeter(), LinkEmulator(cfg.wire)
    chain.install([WireCodec(cfg.wire), meter, link])
    ds = deepspeed_config(cfg, dp)
    ds.update(extra_ds or {})
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=build_optimizer(cfg, module),
                                           lr_scheduler=lr_scheduler, config=ds)
    if module.local_ids is not None:   # bottleneck.token_ids=local: every stage reads its own data
        local_ids.install(engine, module.local_ids)
    codec_inside_stages(module, cfg)
    meter.take()   # drop the engine's start-up ping
    compat.keep_fp32_clip_norm(engine)
    load_deepspeed_checkpoints_safely(engine)
    coord = topology.get_coord(int(os.environ["RANK"]))
    return Runtime(engine, module, coord.pipe, S, coord.data, dp, meter, link)
