"""Benchmark suites: `python -m resbm_ds.bench --suite NAME --out DIR`.

Each run of a suite is a real training: `python -m torch.distributed.run --nproc_per_node 2 -m
resbm_ds.train --config <suite base> <run overrides>` (2 pipeline stages on this machine), all runs
on the same corpus, with the same seed, tokenizer, validation batches and token budget; they differ
only in the boundary method, its ratio, the optimizer, the wire codec and the emulated link
(resbm_ds/wire/link.py). Afterwards:

  DIR/results.json              machine, command, every run's settings, metrics and curves
  DIR/results.md                the comparison table (see COLUMNS) and how to read it
  DIR/val_loss_vs_tokens.png    validation loss against tokens seen
  DIR/loss_vs_wallclock.png     validation loss against emulated wall-clock (sum of step times)
  DIR/tokens_per_s.png          measured tokens/s per run, grouped by link, with the link bound
  DIR/runs/<run>/               each run's metrics.jsonl, config.yaml and log.txt

A run whose boundary method / optimizer / codec the current code does not have (`load_config` or
`Config.validate` rejects it, or the trainer refuses it at start-up) is reported as "unavailable"
instead of stopping the suite; a run that crashes is reported as "failed" with the end of its log.
Finished runs are reused when the suite is run again into the same DIR with the same settings
(`--fresh` reruns them), so an interrupted suite continues where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cli import ConfigError
from ..config import Config, load_config
from ..wire.link import link_bound_tokens_per_s
from ..metrics import METRICS_FILE, read_metrics
from ..model.accounting import parameter_counts
from ..system import free_port
from . import engine
from .runner import children_cpu_s, log_tail, machine_info, run_env


# ---- suite definitions -------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    key: str
    label: str
    mbps: float | None
    latency_ms: float = 0.0

    def overrides(self) -> list[str]:
        return [f"wire.link_bandwidth_mbps={'null' if self.mbps is None else self.mbps}",
                f"wire.link_latency_ms={self.latency_ms}"]


@dataclass(frozen=True)
class RunSpec:
    name: str                  # unique, used as the run's directory name
    label: str                 # the "configuration" column
    link: str                  # a key of Suite.links
    method: str = "none"
    ratio: int | None = None
    optimizer: str = "adamw"
    codec: str = "none"
    codec_backward: bool = False
    extra: tuple[str, ...] = ()

    def overrides(self, suite: "Suite") -> list[str]:
        o = [f"bottleneck.method={self.method}", f"train.optimizer={self.optimizer}",
             f"wire.codec={self.codec}", f"wire.codec_backward={str(self.codec_backward).lower()}"]
        if self.ratio is not None:
            o.append(f"bottleneck.ratio={self.ratio}")
        return o + suite.links[self.link].overrides() + list(self.extra)


@dataclass
class Suite:
    name: str
    config: str                # base config (preset name or path)
    description: str
    links: dict[str, Link]
    runs: list[RunSpec]
    reference: str             # the run every overhead is measured against (uncompressed, fast link)
    rationale: str = ""        # why this model size (goes into results.md)
    timeout_s: int = 1800      # per run
    nprocs: int = 2
    # (compressed runs, their reference runs): the mean of their median step times compared in results.md
    overhead: tuple[tuple[str, ...], tuple[str, ...]] | None = None


# DeepSpeed's Gram Newton-Schulz (its default since 0.19.0) runs in fp32 on a CPU; the "standard"
# quintic runs in bf16 there, and bf16 matmuls on a CPU without native bf16 are ~25x slower than fp32
# (measured: one Muon step ~50 s instead of ~2 s at H=512 on the 2-core box).
MUON_ON_CPU = ("train.muon_ns_method=gram",)


def _paper_runs() -> list[RunSpec]:
    runs = [RunSpec("none-10g", "uncompressed (centralised baseline)", "10g"),
            RunSpec("none-80m", "uncompressed (decentralised baseline)", "80m"),
            RunSpec("resbm-128x-adamw-10g", "ResBM 128x AdamW (compute overhead)", "10g", "resbm", 128)]
    for opt, opt_label in (("adamw", "AdamW"), ("muon", "Muon")):
        for r in (32, 64, 128):
            runs.append(RunSpec(f"resbm-{r}x-{opt}-80m", f"ResBM {r}x {opt_label}", "80m", "resbm", r, opt,
                                extra=MUON_ON_CPU if opt == "muon" else ()))
    for method, label in (("subspace", "Subspace"), ("bottleneck-noskip", "bottleneck, no skip")):
        for r in (32, 64, 128):
            runs.append(RunSpec(f"{method}-{r}x-adamw-80m", f"{label} {r}x AdamW", "80m", method, r))
    runs.append(RunSpec("resbm-128x-adamw-int8-80m", "ResBM 128x AdamW + int8 codec", "80m", "resbm", 128,
                        codec="int8", codec_backward=True))
    return runs


PAPER_CPU_RATIONALE = """\
Model size: H=512, 4 layers (2 per stage), 8 heads, vocab 4096 (sentencepiece BPE trained on the
corpus), sequences of 128 tokens, 4 micro-batches of 4 sequences per step (2,048 tokens), 40 steps
(81,920 tokens) per run; fp32, ZeRO stage 0, AdamW lr 2e-3 (Muon: DeepSpeed's defaults, lr 0.02,
Gram Newton-Schulz, which runs in fp32 on a CPU), warmup 4 steps then cosine to 10%, clipping 1.0.
Why H=512: it is the largest hidden size whose 16 runs fit well under an hour on 2 CPU cores, and
the ratios still mean something there (128x leaves h=4 values per token; at H=256 it would be 2).
Measured before choosing, as 1-thread CPU time of one 4x128-token micro-batch (forward + backward)
on the slower stage (the one with the LM head); a 2-stage 1F1B step of 4 micro-batches costs about
5x that: H=512 0.40 s (about 2 s per step), H=768 0.81-0.90 s (about 4.3 s), H=1024 1.58-1.66 s
(about 8.5 s). In a whole H=512 run (ResBM 64x at 80 Mbit/s + 30 ms, on a machine shared with
other jobs) the fastest steps took 2.8 s. H=768 would leave about 20 steps per run in the same time,
H=1024 about 10: too few for the losses to separate.
"""

# The default boundary's compute cost (issue #23: <= 3%): one process, no link, each configuration twice,
# interleaved, so a drift of the machine shows as a spread between the repeats instead of a gap.
OVERHEAD_RUN = ("train.steps=100", "train.eval_every=100", "train.eval_batches=2", "train.save_every=100",
                "train.warmup_steps=10")
OVERHEAD_RESBM = ("bottleneck.wire_dtype=bf16", *OVERHEAD_RUN)   # h=2 bf16: 4 bytes a token, 128x of dense bf16
OVERHEAD_RATIONALE = """\
Model: the convergence suite's (bench-convergence: H=256, 4 layers in 3 segments, so 2 boundaries, fp32),
in one process (pipeline.stages=1), 100 steps of 2,048 tokens, no emulated link: what is left is
compute. The default ResBM at 128x is h=2 in bf16 with a hashed token table on each decoder (4,096
rows x H, read at the id here since V = 4,096) and the ids read locally. Each configuration runs twice,
interleaved (a, b); the overhead is the mean of the compressed runs' median step times over the
uncompressed runs', and the a/b spread is the measurement's noise. Run it on an otherwise idle machine.
"""

SUITES: dict[str, Suite] = {
    "smoke": Suite(
        name="smoke", config="bench-smoke", reference="none-fast",
        description="A tiny model for a few steps: checks the runner, the codec and the link end to end.",
        # slow: 0.5 Mbit/s makes the tiny uncompressed pipeline link-bound (about 2 s of link time
        # per step against tens of ms of compute): the test checks the link-bound prediction on it.
        links={"fast": Link("fast", "10 Gbit/s", 10_000.0), "slow": Link("slow", "0.5 Mbit/s", 0.5)},
        runs=[RunSpec("none-fast", "uncompressed", "fast"),
              RunSpec("none-slow", "uncompressed", "slow"),
              RunSpec("resbm-16x-int8-slow", "ResBM 16x + int8 codec", "slow", "resbm", 16,
                      codec="int8", codec_backward=True)],
        timeout_s=600),
    "paper-cpu": Suite(
        name="paper-cpu", config="bench-paper-cpu", reference="none-10g",
        description=("The ResBM paper's comparison scaled to a 2-core CPU: uncompressed pipeline at "
                     "10 Gbit/s and 80 Mbit/s; ResBM 32x/64x/128x with AdamW and Muon, Subspace and "
                     "the no-skip bottleneck at the same ratios, and ResBM 128x + int8, at 80 Mbit/s."),
        links={"10g": Link("10g", "10 Gbit/s", 10_000.0), "80m": Link("80m", "80 Mbit/s + 30 ms", 80.0, 30.0)},
        runs=_paper_runs(), rationale=PAPER_CPU_RATIONALE, timeout_s=1800),
    "overhead": Suite(
        name="overhead", config="bench-convergence", reference="none-a",
        description=("The default boundary's compute overhead: the uncompressed model against the default "
                     "ResBM at 128x, same shape, one process, each twice, interleaved."),
        links={"none": Link("none", "none (one process)", None)},
        runs=[RunSpec(f"{name}-{rep}", label, "none", method, ratio, extra=extra)
              for rep in ("a", "b")
              for name, label, method, ratio, extra in (
                  ("none", "uncompressed", "none", None, OVERHEAD_RUN),
                  ("resbm-128x", "ResBM 128x default (h=2 bf16, hashed tables, local ids)", "resbm", 128,
                   OVERHEAD_RESBM))],
        rationale=OVERHEAD_RATIONALE, timeout_s=900, nprocs=1,
        overhead=(("resbm-128x-a", "resbm-128x-b"), ("none-a", "none-b"))),
}


def replace_link(suite: Suite, link: Link) -> Suite:
    label = f"{link.mbps:g} Mbit/s" if link.mbps < 1000 else f"{link.mbps / 1000:g} Gbit/s"
    label += f" + {link.latency_ms:g} ms" if link.latency_ms else ""
    links = {**suite.links, link.key: Link(link.key, label, link.mbps, link.latency_ms)}
    return Suite(**{**{f: getattr(suite, f) for f in suite.__dataclass_fields__}, "links": links})


# ---- one run -----------------------------------------------------------------------------------

FEATURE_KEYS = ("bottleneck.method", "train.optimizer", "wire.codec")


def check_available(spec: RunSpec, suite: Suite) -> tuple[str, str, Config | None]:
    """("ok", "", cfg), or ("unavailable" | "invalid", why, None), without starting any process."""
    try:
        cfg = load_config(suite.config, spec.overrides(suite)).validate(world_size=suite.nprocs)
    except ConfigError as e:
        return ("unavailable" if e.key in FEATURE_KEYS else "invalid"), str(e), None
    return "ok", "", cfg


UNAVAILABLE_IN_LOG = re.compile(r"invalid config: (bottleneck\.method|train\.optimizer|wire\.codec)=")


def analyse(run_dir: Path, cfg: Config, link: Link) -> dict:
    """The numbers of one finished run, from its metrics.jsonl."""
    steps, vals = read_metrics(run_dir)
    clock, t = {}, 0.0
    for r in steps:
        t += r["step_time_s"]
        clock[r["step"]] = t
    tokens_per_step = steps[0]["tokens"] // steps[0]["step"]
    steady = steps[1:] or steps      # step 1 also pays the shape handshake and buffer allocation
    steady_time = sum(r["step_time_s"] for r in steady)
    per_boundary = steady[-1]["wire_bytes_per_boundary"]
    dense = 2 * tokens_per_step * cfg.dense_bytes_per_token("model")            # both directions
    measured = (steady[-1]["wire_bytes_fwd"] / tokens_per_step,                  # one boundary per run
                steady[-1]["wire_bytes_bwd"] / tokens_per_step)
    tail = steps[-max(1, len(steps) // 10):]
    m = dict(
        steps=len(steps), tokens=steps[-1]["tokens"], tokens_per_step=tokens_per_step,
        train_time_s=t, step_time_s=steady_time / len(steady),
        step_time_median_s=statistics.median(r["step_time_s"] for r in steady),
        tokens_per_s=tokens_per_step * len(steady) / steady_time,
        wire_bytes_per_boundary_per_step=per_boundary,
        wire_bytes_fwd_per_step=steady[-1]["wire_bytes_fwd"], wire_bytes_bwd_per_step=steady[-1]["wire_bytes_bwd"],
        dense_bytes_per_boundary_per_step=dense,
        measured_compression=cfg.compression_ratio("model", measured) if any(measured) else None,
        measured_compression_vs_bf16=cfg.compression_ratio("bf16", measured) if any(measured) else None,
        final_train_loss=sum(r["loss"] for r in tail) / len(tail),
        final_val_loss=vals[-1]["val_loss"] if vals else None,
        initial_loss=steps[0]["loss"],
        val_curve=[dict(step=v["step"], tokens=v["tokens"], time_s=clock.get(v["step"]), val_loss=v["val_loss"])
                   for v in vals],
        train_curve=[dict(step=r["step"], tokens=r["tokens"], time_s=clock[r["step"]], loss=r["loss"])
                     for r in steps],
    )
    if link.mbps is not None and per_boundary:
        m["link_bound_tokens_per_s"] = link_bound_tokens_per_s(tokens_per_step, per_boundary, link.mbps)
        m["link_utilisation"] = m["tokens_per_s"] / m["link_bound_tokens_per_s"]
    return m


def val_at_time(metrics: dict, t: float) -> tuple[float, float]:
    """(validation loss, tokens) at emulated time t, linear between evaluations; the curve starts
    at (0 s, the first training loss): a fresh model's validation and training losses agree."""
    pts = [(0.0, metrics["initial_loss"], 0)] + [(v["time_s"], v["val_loss"], v["tokens"])
                                                 for v in metrics["val_curve"]]
    for (t0, l0, k0), (t1, l1, k1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
            return l0 + w * (l1 - l0), k0 + w * (k1 - k0)
    return pts[-1][1], pts[-1][2]


# ---- the suite ---------------------------------------------------------------------------------

class Throughput(engine.Suite):
    """A throughput suite on the engine: its runs one at a time, each in `suite.nprocs` processes; a
    run the code cannot configure is reported as unavailable or invalid, not launched."""

    def __init__(self, suite: Suite, out: Path, specs: list[RunSpec], fresh: bool, keep_checkpoints: bool,
                 command: str):
        super().__init__(out, [engine.Spec(s.name, s) for s in specs], fresh)
        self.suite, self.keep_checkpoints, self.command = suite, keep_checkpoints, command

    def entry(self, spec, done):
        s, link = spec.run, self.suite.links[spec.run.link]
        entry = dict(name=s.name, label=s.label, link=link.label, link_mbps=link.mbps,
                     link_latency_ms=link.latency_ms, method=s.method, ratio=s.ratio,
                     optimizer=s.optimizer, codec=s.codec, codec_backward=s.codec_backward,
                     overrides=s.overrides(self.suite))
        status, why, _ = check_available(s, self.suite)
        if status != "ok":
            entry["status"], entry["error"] = status, why
        return entry

    def launch(self, spec, entry, launcher):
        """Train one configuration in `suite.nprocs` real processes, and analyse it."""
        s, suite, run_dir = spec.run, self.suite, self.run_dir(spec)
        cfg = check_available(s, suite)[2]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={suite.nprocs}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "resbm_ds.train",
               "--config", suite.config, f"train.out_dir={run_dir}", *s.overrides(suite)]
        cpu0 = children_cpu_s()
        rc, wall = launcher.run(cmd, run_dir, suite.timeout_s, run_env())
        entry["wall_s"], entry["cpu_s"] = wall, children_cpu_s() - cpu0
        tail = log_tail(run_dir)
        if rc != 0 or not (run_dir / METRICS_FILE).exists():
            entry["status"] = "unavailable" if UNAVAILABLE_IN_LOG.search(tail) else "failed"
            entry["error"] = tail[-3000:]
            first = entry["error"].strip().splitlines()[-1] if entry["error"].strip() else ""
            self.say(f"{s.name}: {entry['status']}: {first[:300]}")
            return entry
        entry["status"] = "ok"
        entry["metrics"] = m = analyse(run_dir, cfg, suite.links[s.link])
        entry["parameters"] = parameter_counts(cfg.spec, num_stages=1).total
        entry["config_ratio"] = cfg.compression_ratio()
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        bound = f", link bound {m['link_bound_tokens_per_s']:,.0f} tok/s" if "link_bound_tokens_per_s" in m else ""
        self.say(f"{s.name}: done in {wall:.0f} s ({entry['cpu_s']:.0f} CPU s): val loss {m['final_val_loss']:.4f}, "
                 f"{m['tokens_per_s']:,.0f} tok/s{bound}, {m['wire_bytes_per_boundary_per_step']:,} wire bytes/step "
                 f"({_fmt(m['measured_compression'], '.1f')}x)")
        return entry

    def header(self):
        return dict(suite=self.suite.name, description=self.suite.description, base_config=self.suite.config,
                    command=self.command, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine_info(),
                    runs=[])

    def publish(self, results):
        write_outputs(results, self.suite, self.out)

    def finish(self, results):
        results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_suite(suite: Suite, out: Path, only: str | None = None, fresh: bool = False,
              keep_checkpoints: bool = False, steps: int | None = None, command: str = "",
              settings: tuple[str, ...] = (), show_plan: bool = False) -> dict | None:
    extra = [f"train.steps={steps}", f"train.eval_every={max(1, steps // 6)}",
             f"train.warmup_steps={max(1, steps // 10)}"] if steps else []
    extra += list(settings)
    specs = suite.runs
    if extra:   # e.g. a shorter run for timing: every run gets the same changes
        specs = [RunSpec(**{**asdict(s), "extra": tuple(s.extra) + tuple(extra)}) for s in specs]
    return engine.run(Throughput(suite, out, specs, fresh, keep_checkpoints, command), only=only,
                      show_plan=show_plan)


def summarise(results: dict, suite: Suite):
    """Cross-run numbers: equal wall-clock point, overheads against the reference run."""
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    if not ok:
        return
    t_eq = min(r["metrics"]["train_time_s"] for r in ok)
    ref = next((r for r in ok if r["name"] == suite.reference), None)
    results["equal_wallclock_s"] = t_eq
    results["reference"] = suite.reference
    results["token_budget"] = max(r["metrics"]["tokens"] for r in ok)
    for r in ok:
        m = r["metrics"]
        m["val_loss_at_equal_wallclock"], m["tokens_at_equal_wallclock"] = val_at_time(m, t_eq)
        if ref is not None:
            rm = ref["metrics"]
            m["step_time_vs_reference"] = m["step_time_s"] / rm["step_time_s"]
            if r.get("parameters") and ref.get("parameters"):
                m["parameters_vs_reference"] = r["parameters"] / ref["parameters"]
    if suite.overhead:
        results["overhead"] = compute_overhead(results, *suite.overhead)


def compute_overhead(results: dict, compressed: tuple[str, ...], reference: tuple[str, ...]) -> dict | None:
    """The compressed runs' mean median step time over the reference runs', with each repeat's ratio."""
    med = {r["name"]: r["metrics"]["step_time_median_s"] for r in results["runs"]
           if r["status"] == "ok" and "step_time_median_s" in r.get("metrics", {})}
    if not all(n in med for n in (*compressed, *reference)):
        return None
    c, ref = statistics.fmean(med[n] for n in compressed), statistics.fmean(med[n] for n in reference)
    return dict(compressed=list(compressed), reference=list(reference), step_time_s=c, reference_step_time_s=ref,
                ratio=c / ref, repeat_ratios=[med[a] / med[b] for a, b in zip(compressed, reference)],
                reference_spread=max(med[n] for n in reference) / min(med[n] for n in reference) - 1)


def write_outputs(results: dict, suite: Suite, out: Path):
    summarise(results, suite)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results, suite))
    plot(results, out)


def _fmt(x, spec=".3f", none="–"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(results: dict, suite: Suite) -> str:
    mach = results["machine"]
    runs = results["runs"]
    ok = [r for r in runs if r["status"] == "ok"]
    lines = [f"# resbm-ds bench: suite `{results['suite']}`", "", results["description"], ""]
    if results.get("command"):
        lines += ["Command:", "", f"    {results['command']}", ""]
    lines += [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, "
              f"{'GPU ' + mach['gpu'] if mach.get('gpu') else 'no GPU'}; {mach['os']}; Python {mach['python']}, "
              f"torch {mach['torch']}, deepspeed {mach['deepspeed']}. Load average at start "
              f"{_fmt_load(mach.get('load_average'))}"
              + (f", at end {_fmt_load(mach.get('load_average_end'))}" if mach.get("load_average_end") else "")
              + " (other work on the machine slows compute, never the emulated link).",
              f"Started {results['started']}" + (f", finished {results['finished']}." if results.get("finished")
                                                  else " (unfinished)."), ""]
    if suite.rationale:
        lines += [suite.rationale, ""]
    if ok:
        budget = results["token_budget"]
        t_eq = results["equal_wallclock_s"]
        layout = "2 pipeline stages, one boundary" if suite.nprocs == 2 else "one process"
        lines += [f"Every run: base config `{results['base_config']}`, {budget:,} training tokens, same seed, "
                  f"data order and validation batches; {layout}.", ""]
        lines += ["| configuration | link | measured compression | tokens/s | link-bound tokens/s | "
                  f"val loss at equal tokens ({budget:,}) | val loss at equal wall-clock ({t_eq:.0f} s) "
                  "| tokens by then | parameters vs uncompressed | step time vs uncompressed @ fast link |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ok:
            m = r["metrics"]
            lines.append(
                f"| {r['label']} | {r['link']} | {_fmt(m['measured_compression'], '.1f')}x | "
                f"{_fmt(m['tokens_per_s'], ',.0f')} | {_fmt(m.get('link_bound_tokens_per_s'), ',.0f')} | "
                f"{_fmt(m['final_val_loss'])} | {_fmt(m.get('val_loss_at_equal_wallclock'))} | "
                f"{_fmt(m.get('tokens_at_equal_wallclock'), ',.0f')} | "
                f"{_fmt_rel(m.get('parameters_vs_reference'))} | {_fmt_rel(m.get('step_time_vs_reference'))} |")
        lines.append("")
    if (o := results.get("overhead")):
        lines += [f"**Compute overhead**: median step time {o['step_time_s']:.4f} s ({', '.join(o['compressed'])}) "
                  f"against {o['reference_step_time_s']:.4f} s ({', '.join(o['reference'])}): "
                  f"**{100 * (o['ratio'] - 1):+.1f}%** (per repeat: "
                  f"{', '.join(f'{100 * (x - 1):+.1f}%' for x in o['repeat_ratios'])}; the two uncompressed runs "
                  f"differ by {100 * o['reference_spread']:.1f}%).", ""]
    lines += regime_notes(results, suite)
    missing = [r for r in runs if r["status"] != "ok"]
    if missing:
        lines += ["Not run:", ""]
        for r in missing:
            err = r.get("error", "").strip().splitlines()
            lines.append(f"- {r['label']} @ {r['link']} (`{r['name']}`): **{r['status']}**"
                         + (f": {err[-1][:300]}" if err else ""))
        lines.append("")
    lines += [
        "How to read the columns:",
        "",
        "- measured compression: bytes an uncompressed boundary would carry per step in one direction "
        "(at the model's dtype) / bytes the wire meter counted at the boundary in the busier direction "
        "(after any codec; token ids included where a method sends them); results.json also has it "
        "against a dense bf16 boundary (`measured_compression_vs_bf16`).",
        "- tokens/s: tokens per step / mean step time, steps 2..N (step 1 also pays the one-off shape "
        "handshake). Step times are measured by the trainer around `train_batch`, so they include the "
        "emulated link (resbm_ds/wire/link.py: every transfer pays bytes/bandwidth + latency, one queue per "
        "link for both directions); evaluation is not counted.",
        "- link-bound tokens/s: the most the link allows for the bytes measured, "
        "tokens/step / (bytes per boundary per step x 8 / bandwidth); latency ignored.",
        "- val loss at equal tokens: validation loss after the whole (shared) token budget.",
        "- val loss at equal wall-clock: validation loss, interpolated between evaluations, at the "
        "emulated training time of the fastest run (sum of its step times), the paper's 'final loss "
        "after a fixed wall-clock budget'; 'tokens by then' is how far each run had got.",
        "- parameters / step time vs uncompressed: ratios to the uncompressed run on the fast link "
        f"(`{suite.reference}`); the ResBM run on the fast link isolates its compute overhead.",
        "",
        "Plots: `val_loss_vs_tokens.png`, `loss_vs_wallclock.png`, `tokens_per_s.png`. "
        "Per-run logs and metrics: `runs/<name>/`.", ""]
    return "\n".join(lines)


PAPER_COMPUTE_OVER_LINK = 7530 / 609   # the paper's centralised tokens/s over its 80 Mbit/s link bound


def regime_notes(results: dict, suite: Suite) -> list[str]:
    """Is each emulated link the bottleneck for the uncompressed pipeline on THIS machine?"""
    ref = next((r for r in results["runs"] if r["name"] == suite.reference and r["status"] == "ok"), None)
    if ref is None or not any(r["link_mbps"] for r in results["runs"]):
        return []
    m = ref["metrics"]
    compute, tps, dense = m["tokens_per_s"], m["tokens_per_step"], m["dense_bytes_per_boundary_per_step"]
    notes = ["Link regime on this machine (uncompressed pipeline, measured on the fast link: "
             f"{compute:,.0f} tokens/s):", ""]
    for link in sorted({(r["link"], r["link_mbps"]) for r in results["runs"] if r["link_mbps"]},
                       key=lambda x: x[1]):
        bound = link_bound_tokens_per_s(tps, dense, link[1])
        verdict = "the bottleneck" if bound < compute else "not the bottleneck"
        notes.append(f"- {link[0]}: an uncompressed boundary allows at most {bound:,.0f} tokens/s, so the link "
                     f"is {verdict} (compute / link bound = {compute / bound:.3g}; the paper's setting is "
                     f"{PAPER_COMPUTE_OVER_LINK:.1f}, which here would take about "
                     f"{link[1] * compute / bound / PAPER_COMPUTE_OVER_LINK:.2g} Mbit/s).")
    return notes + [""]


def _fmt_load(load):
    return "–" if not load else ", ".join(f"{x:.1f}" for x in load)


def _fmt_rel(x):
    return "–" if x is None else f"{x:.3f}x"


def plot(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results["runs"] if r["status"] == "ok"]
    cmap = plt.get_cmap("tab20")
    style = {r["name"]: dict(color=cmap(i % 20), linestyle="--" if (r["link_mbps"] or 1e9) < 1000 else "-",
                             marker="o", markersize=3) for i, r in enumerate(ok)}

    def label(r):
        return f"{r['label']} @ {r['link']}"

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in ok:
        c = r["metrics"]["val_curve"]
        ax.plot([v["tokens"] for v in c], [v["val_loss"] for v in c], label=label(r), **style[r["name"]])
    ax.set(xlabel="training tokens", ylabel="validation loss", title=f"{results['suite']}: validation loss vs tokens")
    _finish(fig, ax, out / "val_loss_vs_tokens.png", bool(ok))

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in ok:
        m = r["metrics"]
        pts = [(0.0, m["initial_loss"])] + [(v["time_s"], v["val_loss"]) for v in m["val_curve"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label(r), **style[r["name"]])
    if results.get("equal_wallclock_s"):
        ax.axvline(results["equal_wallclock_s"], color="grey", linewidth=0.8, linestyle=":")
    ax.set(xlabel="emulated wall-clock: sum of step times (s)", ylabel="validation loss",
           title=f"{results['suite']}: validation loss vs emulated wall-clock")
    _finish(fig, ax, out / "loss_vs_wallclock.png", bool(ok))

    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.35 * max(1, len(ok))))
    order = sorted(ok, key=lambda r: (-(r["link_mbps"] or 1e12), r["name"]))
    y = list(range(len(order)))
    ax.barh(y, [r["metrics"]["tokens_per_s"] for r in order], color=[style[r["name"]]["color"] for r in order])
    bounds = [(i, r["metrics"].get("link_bound_tokens_per_s")) for i, r in enumerate(order)]
    bounds = [(i, b) for i, b in bounds if b is not None]
    if bounds:
        ax.plot([b for _, b in bounds], [i for i, _ in bounds], "k|", markersize=12, label="link-bound tokens/s")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(y, [label(r) for r in order], fontsize=7)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set(xlabel="tokens/s (log scale)", title=f"{results['suite']}: measured tokens/s per link")
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=120)
    plt.close(fig)


def _finish(fig, ax, path, legend):
    if legend:
        ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt
    plt.close(fig)
