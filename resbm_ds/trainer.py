"""One rank's training run behind `python -m resbm_ds.train` (resbm_ds/train.py, the command line):
`Trainer(plan).train()` takes a launch plan (launch.py: everything checked before launch), builds
the engine, and owns the loop with its signals, health checks, evaluations and checkpoints, and the
closing summary."""
from __future__ import annotations

import math
import os
import resource
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
from .checkpoints import store
from .checkpoints.loading import UnsafeCheckpoint
from .config import TrainConfig
from .data.batches import PackedBatches, validation_batches
from .data.sources import evaluation_parts
from .data.tokenizer import save_tokenizer
from .engine import Runtime, StepGuard, all_ranks_agree, build_engine, finite_weights
from .launch import LaunchPlan
from .metrics import Metrics, NetCounters, is_terminal, peak_flops, read_metrics
from .optim import newton_schulz_dtype
from .run_dir import CONFIG_FILE, clear_run, write_layout
from .slurm_layout import report_layout
from .sync import SiteSync
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



def save_failed(ckpt_dir: Path, tag: str, error: BaseException | None, health: Health) -> TrainingError:
    """The line for a save that failed (on this rank, or only on a peer: `error` None); rank 0
    removes the cut-short tag."""
    if dist.get_rank() == 0:
        store.discard(ckpt_dir, tag)
    if error is None:
        return TrainingError(f"saving checkpoint {tag} failed on another rank; {health.good()}")
    full = store.out_of_space(ckpt_dir, error)
    if full:
        need = f"; a checkpoint of this run takes {store.tag_bytes(ckpt_dir / health.last_good):,} bytes" \
            if health.last_good and (ckpt_dir / health.last_good).is_dir() else ""
        why = f"{full}{need}: free space, then continue with --resume"
    else:
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    return TrainingError(f"saving checkpoint {tag} in {ckpt_dir} failed ({why}); it was removed; {health.good()}")



class Trainer:
    """One rank's training run (torchtitan's and GPT-NeoX's pattern): built from a launch plan, it
    owns the engine, the stop signals and watches, the loop with its health checks, evaluations and
    checkpoints, and the closing summary. `Trainer(plan).train()` -> the last training loss."""

    def __init__(self, plan: LaunchPlan):
        self.plan, self.cfg, self.out = plan, plan.cfg, plan.run.out
        cfg = self.cfg
        self.stop: StopSignals | None = None
        watch = LauncherWatch(self._launcher_gone)
        self.rt = rt = build_engine(plan, lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_factor(s, cfg.train)))
        rt.sync = SiteSync.create(cfg, rt.module, rt.stage, rt.num_stages, rt.dp_rank, rt.dp_size,
                                  rt.engine.grid.get_data_parallel_group())
        # Signals are caught from here on, to save first. Until here they keep their default action: a
        # rank blocked in the rendezvous (C++, where a Python handler never runs) must still die on SIGTERM.
        self.stop = StopSignals()
        self.stop.launcher = watch
        self.health = Health(cfg.train, cfg.model.vocab_size, StepGuard(rt.engine), plan.run.resume_tag)
        report_layout(rt, cfg.runtime.strict_layout)   # each rank: its node, stage and data-parallel rank; rank 0 checks the layout
        self.rank0 = dist.get_rank() == 0
        self.peers = Peers()
        rt.meter.take()    # the peer table's gather is not part of step 1's figures
        # With stages, p2p moves data every micro-batch; a single stage's step may compute for longer
        # than the timeout without a message, and its collectives have the timeout themselves. A little
        # past the collectives' own timeout, so that a collective that times out reports first
        # (`peer_failure`); the watch catches what has no timeout of its own.
        self.progress = ProgressWatch(self.peers, cfg.runtime.dist_timeout_s + 5, activity=lambda: rt.meter.transfers,
                                      enabled=rt.num_stages > 1)
        if self.rank0 and plan.run.overwrite:
            clear_run(self.out)
        dist.barrier()
        # every replica of every site reads its own share: sites split the data as data-parallel ranks do
        self.data = PackedBatches(plan.train_src, plan.tokenizer, cfg.data.seq_len, cfg.micro_batch_size,
                                  cfg.sync.site_rank * rt.dp_size + rt.dp_rank, cfg.sync.sites * rt.dp_size,
                                  seed=cfg.seed)
        self.ckpt_dir = self.out / "checkpoints"
        self.start = self.resume(plan.run.resume_tag) if plan.run.resume_tag else 0
        if self.rank0:
            self._write_run_files()

    def _launcher_gone(self, why: str):   # `deepspeed` forwards no signals: a launcher that ends stops the rank
        if self.stop is None:             # still starting (a rendezvous may wait for minutes): nothing to save
            print(f"error (rank {os.environ.get('RANK', '0')}): {why} during start-up; exiting",
                  file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)
        self.stop.request(signal.SIGTERM, why)

    def _write_run_files(self):
        """Rank 0 at start: config.yaml, the layout, the tokenizer, and the lines that say what runs."""
        cfg, rt, t, start = self.cfg, self.rt, self.cfg.train, self.start
        S, dp = rt.num_stages, rt.dp_size
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_layout(self.out, S, dp)
        save_tokenizer(self.plan.tokenizer, self.out / "tokenizer")
        print("[resbm] config (resolved):\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), flush=True)
        print(self.plan.describe(), flush=True)
        muon = (f"; Muon Newton-Schulz {t.muon_ns_method} in {newton_schulz_dtype(t.muon_ns_method)}"
                if t.optimizer == "muon" else "")
        print(f"[resbm] {S} stages x {dp} data-parallel, {cfg.bottleneck.method} boundary h={cfg.code_width} "
              f"({cfg.compression_ratio():.3g}x vs dense bf16), {cfg.precision}, ZeRO-{cfg.zero_stage}; "
              f"{'resuming at step ' + str(start + 1) if start else 'starting at step 1'}{muon}", flush=True)
        for key, (old, new) in self.plan.run.changes.items():
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

    # ---- the run ---------------------------------------------------------------------------------

    def train(self) -> float:
        """The steps from the plan's start to train.steps, then (rank 0) the summary."""
        cfg = self.cfg
        self.bar = progress_bar(self.rank0 and is_terminal(), self.start, cfg.train.steps)
        self.metrics = Metrics(cfg, self.out, self.start, self.rank0, plain_lines=self.bar is None)
        ok = False
        try:
            loss = self.loop()
            ok = True
        except RuntimeError as e:    # a peer died mid-collective: say so in one line, naming it when we can
            line = (None if isinstance(e, (TrainingError, UnsafeCheckpoint)) else
                    peer_failure(e, self.peers, cfg.runtime.dist_timeout_s))
            if line is None:
                raise
            raise TrainingError(line) from None
        finally:
            if self.bar:
                self.bar.close()
            self.metrics.close(ok)
        if self.rank0 and self.start < cfg.train.steps:
            self.summarize()
        return loss

    def loop(self) -> float:
        """Each training step runs under `progress`'s runtime.dist_timeout_s deadline; evaluations
        and saves, which may rightly take longer (many batches, a large checkpoint), are bounded only by
        the same timeout on each of their collectives."""
        cfg, rt, t, health, metrics, bar = self.cfg, self.rt, self.cfg.train, self.health, self.metrics, self.bar
        dp = rt.dp_size
        tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * dp * cfg.data.seq_len
        boundaries = (rt.num_stages - 1) * dp
        flops_per_token, peak = cfg.train_flops_per_token(), peak_flops()
        net = NetCounters(cfg.runtime.net_iface) if cfg.runtime.net_iface else None   # a real link's counters (netem.py)
        self.eval_at = evaluation_parts(cfg, self.plan.val_src, self.plan.tokenizer, dp)
        boundary_stats = BoundaryStats(rt.engine.module)
        if t.init_from and self.start == 0:
            self.log_evaluation(0, tokens=0)
        loss = float("nan")
        for step in range(self.start + 1, t.steps + 1):
            lr = rt.engine.get_lr()[0]
            net_before = net.read() if net else None
            t0 = time.perf_counter()
            with self.progress.phase(f"step {step}"):
                loss = float(rt.engine.train_batch(data_iter=self.data))
            if rt.sync:   # every sync.inner_steps steps, the outer step across sites: bounded by sync.timeout_s
                rt.sync.after_step(step, loss)
            with self.progress.phase(f"step {step}"):
                dt = time.perf_counter() - t0
                net_step = NetCounters.delta(net_before, net.read()) if net else {}
                fwd, bwd, other, sites, stop_signum, param_rms = step_totals(rt, self.stop)
            grad_norm = rt.engine.get_global_grad_norm()   # after clipping's own reduction, where there is one
            row = dict(step=step, loss=loss, lr=lr,
                       grad_norm=health.guard.norm if grad_norm is None else float(grad_norm),
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
                val = self.log_evaluation(step, tokens=step * tokens_per_step)
                if bar:
                    bar.write(f"step {step}: val_loss {val['val_loss']:.4f}")
            if (good and (step % t.save_every == 0 or step == t.steps)) or stop_signum:
                t0 = time.perf_counter()
                if not finite_weights(rt.module):
                    raise TrainingError(f"the weights are not finite after step {step}: not saved; "
                                        f"{health.good()}; lower train.lr")
                tag = self.save(step)
                health.last_good = tag
                rt.meter.take()   # the weight check's reduction is not part of the next step's figures
                metrics.log(dict(step=step, checkpoint=tag, checkpoint_s=time.perf_counter() - t0, time=time.time()))
                if stop_signum:
                    # a peer may have seen the launcher end first: the same launchers are above every rank
                    stop = self.stop
                    raise Stopped(stop_signum, step, tag, stop.reason or (not stop.signum and stop.launcher.ended()) or "")
        return loss

    def log_evaluation(self, step: int, tokens: int) -> dict:
        t0 = time.perf_counter()
        val = self.evaluate()
        self.rt.meter.take()   # evaluation traffic is not part of the next step's figures
        self.metrics.log(dict(step=step, **val, tokens=tokens, eval_s=time.perf_counter() - t0, time=time.time()))
        return val

    def evaluate(self) -> dict:
        """The validation loss over the evaluation's parts (data/sources.py evaluation_parts),
        weighted by tokens, its size in tokens, and the loss of each part when there are several (one
        per source of the default corpus)."""
        cfg, rt = self.cfg, self.rt
        losses = {}
        for part, n in self.eval_at:
            batches = validation_batches(self.plan.val_src, self.plan.tokenizer, cfg.data.seq_len,
                                         cfg.micro_batch_size, rt.dp_rank, rt.dp_size, num_batches=n,
                                         chunk_range=part and (part.first_chunk, part.end_chunk))
            losses[part.name if part else "all"] = float(rt.engine.eval_batch(data_iter=batches, num_micro_batches=n)), n
        total = sum(n for _, n in losses.values())
        row = dict(val_loss=sum(loss * n for loss, n in losses.values()) / total,
                   eval_tokens=total * cfg.micro_batch_size * rt.dp_size * cfg.data.seq_len)
        if len(losses) > 1:
            row["val_loss_by_source"] = {name: loss for name, (loss, _) in losses.items()}
        return row

    # ---- checkpoints -----------------------------------------------------------------------------

    def save(self, step: int) -> str:
        """All ranks write their files under a new tag; only then does rank 0 hash them into the tag's
        manifest and point `latest` at it, each atomically (write + rename), and prune old tags
        (train.keep_last; checkpoints/store.py `publish`). A run killed mid-save therefore resumes from the previous tag. A save
        that fails on any rank (a full disk) fails on every rank, in one line, and rank 0 removes what
        it left, so that no cut-short tag is ever offered."""
        rt, ckpt_dir, tag = self.rt, self.ckpt_dir, store.tag_for(step)
        failed = None
        try:
            rt.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                                      client_state={"step": step, "data": self.data.state_dict()})
            if rt.sync:
                rt.sync.save(ckpt_dir / tag)   # theta_start, outer momentum, error feedback (sync.py)
        except (OSError, RuntimeError) as e:
            failed = e
        if all_ranks_agree(failed is not None):
            raise save_failed(ckpt_dir, tag, failed, self.health)
        if dist.get_rank() == 0:
            try:
                store.publish(ckpt_dir, tag, self.cfg.train.keep_last)
            except OSError as e:
                failed = e
        if all_ranks_agree(failed is not None):
            raise save_failed(ckpt_dir, tag, failed, self.health)
        return tag

    def resume(self, tag: str) -> int:
        """-> the step the checkpoint `tag` was saved after. Its files were checked against its manifest
        before launch (run_dir.plan_run); a checkpoint without one (an older run) that DeepSpeed cannot
        read is reported in one line too."""
        rt, ckpt_dir = self.rt, self.ckpt_dir
        try:
            path, client = rt.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        except UnsafeCheckpoint:
            raise
        except (OSError, RuntimeError, EOFError, AssertionError, KeyError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise TrainingError(f"could not load checkpoint {tag} from {ckpt_dir} ({type(e).__name__}: {first}); "
                                f"{store.previous_offer(ckpt_dir, tag)}") from None
        if path is None or not client:
            raise TrainingError(f"could not load checkpoint {tag} from {ckpt_dir}")
        if not finite_weights(rt.module):   # saved before runs checked their steps (Health)
            raise TrainingError(f"checkpoint {tag} in {ckpt_dir} holds non-finite weights; "
                                f"{store.previous_offer(ckpt_dir, tag)}")
        self.data.load_state_dict(client["data"])
        if rt.sync:
            rt.sync.load(ckpt_dir / tag)
        follow_schedule(rt.engine.lr_scheduler)
        return int(client["step"])

    def summarize(self):
        """The closing lines: final loss, throughput, bytes per boundary and the measured ratio."""
        cfg, S, dp = self.cfg, self.rt.num_stages, self.rt.dp_size
        steps, vals = read_metrics(self.out)
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
