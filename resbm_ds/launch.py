"""The launch plan: every check a run makes before any process group exists, in one order, and the
frozen `LaunchPlan` that `engine.build_engine` takes.

    check_config(cfg, world_size)   the config's own checks, what the machine must have (files,
                                    packages, interfaces), DeepSpeed's schema, the installed
                                    DeepSpeed, model.init_from_hf and train.init_from
    plan_launch(...)                the above, then trackers and the hub reachable, the text, the run
                                    directory (lock, resume tag, what may change), the tokenizer and
                                    enough text: what `python -m resbm_ds.train` runs

A bad value fails here in one line (cli.UserError), before any rank waits for another.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from . import compat
from .checkpoints.store import checkpoint_dir
from .cli import ConfigError, UserError
from .config import Config, config_error, load_config, runtime_key
from .data.batches import TextSource, check_hub_reachable
from .data.sources import check_enough_text, make_tokenizer, text_sources
from .data.tokenizer import Tokenizer
from .hf.configs import check_model_matches_hf
from .hf.weights import check_hf_weights
from .metrics import check_trackers_reachable
from .model.accounting import cost_summary
from .run_dir import RunPlan, check_init_from, check_tokenizer, plan_run
from .sync import describe_sites

INIT_FROM_USE = "train.init_from=<checkpoints>/{tag}"


@dataclass(frozen=True)
class LaunchPlan:
    """A run that passed every check: its config, for how many processes, and (from `plan_launch`)
    its run directory, text and tokenizer. `build_engine` takes nothing else."""
    cfg: Config
    world_size: int
    run: RunPlan | None = None             # out_dir, the tag to resume, what changed (plan_launch)
    train_src: TextSource | None = None
    val_src: TextSource | None = None
    tokenizer: Tokenizer | None = None

    @property
    def stages(self) -> int:
        return self.cfg.pipeline.stages

    @property
    def dp_size(self) -> int:
        return self.world_size // self.stages

    def describe(self) -> str:
        """The plan line every run prints first."""
        cfg, S, world = self.cfg, self.stages, self.world_size
        fwd, bwd = cfg.wire_bytes_per_token
        start = (f"resume from {self.run.resume_tag}" if self.run.resume_tag else
                 f"weights from train.init_from={cfg.train.init_from}" if cfg.train.init_from else
                 f"weights from model.init_from_hf={cfg.model.init_from_hf}" if cfg.model.init_from_hf else
                 "from scratch")
        tokens = cfg.micro_batch_size * cfg.grad_accum_steps * self.dp_size * cfg.data.seq_len
        val = self.val_src.describe()
        val = "on the training text (no data.val_path)" if val == self.train_src.describe() else val
        return (f"[resbm] plan: {S} stages x {self.dp_size} data-parallel on {world} processes; "
                f"{cfg.bottleneck.method} boundary h={cfg.code_width}, {fwd} / {bwd} bytes per token forward / "
                f"backward ({cfg.compression_ratio():.3g}x vs dense bf16); {cost_summary(cfg.spec, cfg.pipeline.stages)}; "
                f"{cfg.train.steps} steps x {tokens:,} tokens; {start}; data {self.train_src.describe()}, "
                f"validation {val}; out_dir {self.run.out}{describe_sites(cfg)}")


def map_slurm_env():
    """Under `srun` (or `deepspeed --launcher slurm`) ranks come from SLURM_*; torch wants RANK etc."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def world_size_from_env() -> int:
    map_slurm_env()
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"WORLD_SIZE={text!r} (set by the launcher, or SLURM_NTASKS): must be a whole number >= 1")
    return int(text)


def check_config(cfg: Config, world_size: int | None = None) -> LaunchPlan:
    """The checks of a run's settings: the config's own (`Config.validate`), DeepSpeed's schema,
    what local ids need of the installed DeepSpeed, and the weights a run starts from
    (model.init_from_hf must match the model; train.init_from must be a checkpoint of it)."""
    world_size = world_size or world_size_from_env()
    cfg.validate(world_size=world_size)
    check_machine(cfg)
    check_deepspeed_schema(cfg)
    if cfg.token_ids == "local" and (problem := compat.deepspeed_version_problem()):
        raise ConfigError("bottleneck.token_ids", "local", problem)
    if cfg.model.init_from_hf:
        check_model_matches_hf(cfg.model, cfg.model.init_from_hf, seq_len=cfg.data.seq_len)
        check_hf_weights(cfg.model, cfg.model.init_from_hf)
    if cfg.train.init_from:
        try:
            checkpoint_dir(cfg.train.init_from, use=INIT_FROM_USE)
        except FileNotFoundError as e:
            raise ConfigError("train.init_from", cfg.train.init_from, str(e)) from None
        check_init_from(cfg)
    return LaunchPlan(cfg, world_size)


def check_machine(cfg: Config) -> None:
    """What this machine must have for the config: the files and directories it names, the packages
    of the trackers it turns on, the network interface it counts."""
    iface = cfg.runtime.net_iface
    if iface and not (Path("/sys/class/net") / iface).is_dir():
        have = sorted(p.name for p in Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else []
        raise ConfigError(runtime_key("net_iface"), iface, f"no such network interface here (have: {have})")
    d = cfg.data
    if d.tokenizer == "sentencepiece" and not Path(d.tokenizer_path).expanduser().is_file():
        raise ConfigError("data.tokenizer_path", d.tokenizer_path, "no such sentencepiece .model file")
    if d.tokenizer == "hf" and d.tokenizer_path.startswith(("/", "./", "../", "~")) \
            and not Path(d.tokenizer_path).expanduser().is_dir():
        raise ConfigError("data.tokenizer_path", d.tokenizer_path, "no such transformers tokenizer directory")
    t = cfg.train
    if t.init_from is not None and not Path(t.init_from).exists():
        raise ConfigError("train.init_from", t.init_from,
                          "no such run or checkpoint directory (RUN_DIR or RUN_DIR/checkpoints/TAG)")
    for flag, module, extra in (("wandb", "wandb", "track"), ("mlflow", "mlflow", "track")):
        if getattr(cfg.tracking, flag) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking.{flag}", True, f"needs the {module} package: pip install 'resbm-ds[{extra}]'")


def plan_launch(config: str | None, overrides=(), *, resume: bool = False, resume_from: str | None = None,
                overwrite: bool = False, dry_run: bool = False, config_only: bool = False) -> LaunchPlan:
    """Everything that can fail on bad input, in order, before any process group exists.
    `config_only` (--print-config) stops after the config's own checks and the services it names."""
    plan = check_config(load_config(config, list(overrides)))
    cfg, world = plan.cfg, plan.world_size
    check_trackers_reachable(cfg)
    check_hub_reachable(cfg)
    if config_only:
        return plan
    train_src, val_src = text_sources(cfg)
    lock = "none" if int(os.environ.get("RANK", "0")) else "check" if dry_run else "hold"
    run = plan_run(cfg, resume or bool(resume_from), resume_from, overwrite, world, lock)
    tok = make_tokenizer(cfg, train_src)
    if run.resume_tag:
        check_tokenizer(run.out, tok)
    check_enough_text(cfg, tok, train_src, val_src, world)
    return LaunchPlan(cfg, world, run, train_src, val_src, tok)


def check_deepspeed_schema(cfg: Config) -> None:
    """DeepSpeed's own schema (its pydantic section models and asserts), run now instead of inside
    deepspeed.initialize: a wrong type or an unknown key in a section becomes a ConfigError naming it.
    The batch size is left to DeepSpeed to derive (it assumes one process before the group exists)."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    ds = {k: v for k, v in deepspeed_config(cfg, 1).items() if k != "train_batch_size"}
    try:
        DeepSpeedConfig(ds)
    except ValidationError as e:
        # DeepSpeed validates each section on its own, so `loc` starts inside one: find which
        loc = e.errors()[0]["loc"]
        section = next((s for s, v in ds.items() if isinstance(v, dict) and loc and loc[0] in v), None)
        raise config_error(e, prefix="deepspeed." + (f"{section}." if section else ""),
                           note=f" (DeepSpeed's {e.title})") from None
    except AssertionError as e:
        raise ConfigError("deepspeed", "...", f"DeepSpeed refuses the config: {e}") from None


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed JSON the engine gets: the config's, with the batch sizes filled in."""
    ds = dict(cfg.ds)
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.micro_batch_size)
    ds.setdefault("gradient_accumulation_steps", cfg.grad_accum_steps)
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * dp_size
    return ds
