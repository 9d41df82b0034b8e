"""The convergence suite: what compression costs in loss, `python -m resbm_ds.bench --suite convergence`.

Every run trains the same model (resbm_ds/configs/bench-convergence.yaml: H=256, 4 layers, 3 segments
so 2 boundaries, 600 steps x 2,048 tokens = 1.23M tokens) on the same corpus, tokenizer, data order
and validation batches, in one process (`pipeline.stages=1`; the losses equal the 2-stage ones,
tests/test_core_pipeline.py). Runs differ only in the boundary, its width, the optimizer, the wire
codec and the seed. `--jobs` runs go at once (default 2: one per core of the 2-core box).

Bytes are counted as the paper counts them: the ratio is a dense bf16 boundary's bytes per token per
direction (2H = 512 at H=256) over the bytes sent per token in the busier direction, code plus codec
scale plus token ids, from `Config.wire_bytes_per_token` (the formula tests/test_wire_bytes.py checks
against the wire meter of 2-stage runs). So "128x" allows 4 bytes per token: h=2 in bf16, or h=1 in
bf16 plus an int16 token id.

Outputs in DIR: results.json (machine, command, every run's settings, curve and figures),
results.md (tables: every run with its gap against the same-optimizer uncompressed control at equal
tokens; seed spread; gap against code width h), val_loss_vs_tokens.png, gap_vs_width.png, and
runs/<name>/ (metrics.jsonl, config.yaml, log.txt). Finished runs are reused when the suite is run
again into the same DIR with the same overrides, so an interrupted suite resumes; `--only REGEX`
runs a subset.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, load_config
from ..metrics import METRICS_FILE, read_metrics
from ..model.accounting import parameter_counts
from .runner import free_port, log_tail, machine_info, run_env, run_logged

CONFIG = "bench-convergence"
MUON = ("train.optimizer=muon", "train.muon_ns_method=gram")   # Gram NS runs in fp32 on a CPU


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    group: str                 # the table section it belongs to
    overrides: tuple[str, ...] = ()
    seed: int = 1234

    @property
    def optimizer(self) -> str:
        return "muon" if "train.optimizer=muon" in self.overrides else "adamw"

    def all_overrides(self, out: Path, settings=()) -> list[str]:
        return [*self.overrides, *settings, f"seed={self.seed}", f"train.out_dir={out / 'runs' / self.name}"]


def resbm(width: int, *extra: str) -> tuple[str, ...]:
    """A ResBM run with every boundary switch spelled out (`extra` overrides them), so a change of
    the defaults never changes what a run of this suite means."""
    explicit = {"init": "identity", "decoder": "linear", "decoder_norm": "rms", "token_channel": "none"}
    for e in extra:
        explicit.pop(e.split("=")[0].removeprefix("bottleneck."), None)
    return ("bottleneck.method=resbm", f"bottleneck.width={width}", "bottleneck.wire_dtype=bf16",
            *(f"bottleneck.{k}={v}" for k, v in explicit.items()), *extra)


PAPER_FORM = ("bottleneck.init=normal",)
TOKENS = ("bottleneck.token_channel=learned",)


def _runs() -> list[Run]:
    """In priority order: an interrupted suite has the headline comparisons first."""
    r = [
        Run("none-adamw", "uncompressed", "control"),
        Run("resbm-128x-adamw", "ResBM 128x (h=2)", "ratio", resbm(2)),
        Run("resbm-128x-tok-adamw", "ResBM 128x (h=1 + token ids, learned table)", "variant", resbm(1, *TOKENS)),
        Run("resbm-128x-tok-raw-adamw", "ResBM 128x (h=1 + token ids, learned table), decoder reads raw b",
            "variant", resbm(1, *TOKENS, "bottleneck.decoder_norm=none")),
        Run("resbm-128x-paper-adamw", "ResBM 128x (h=2), paper form (N(0,0.02) init)", "variant", resbm(2, *PAPER_FORM)),
        Run("none-muon", "uncompressed", "control", MUON),
        Run("resbm-128x-muon", "ResBM 128x (h=2)", "ratio", resbm(2) + MUON),
        Run("none-tok-adamw", "uncompressed + learned token tables (control)", "variant",
            ("bottleneck.method=none", *TOKENS)),
        Run("resbm-128x-tok-adamw-s2", "ResBM 128x (h=1 + token ids, learned table)", "variant", resbm(1, *TOKENS), seed=2),
        Run("resbm-128x-lowrank-adamw", "ResBM 128x (h=1 + token ids, rank-32 table)", "variant",
            resbm(1, "bottleneck.token_channel=lowrank")),
        Run("resbm-128x-tok-muon", "ResBM 128x (h=1 + token ids, learned table)", "variant", resbm(1, *TOKENS) + MUON),
        Run("noskip-128x-adamw", "no-skip bottleneck 128x (h=2)", "baseline",
            ("bottleneck.method=bottleneck-noskip", "bottleneck.width=2", "bottleneck.wire_dtype=bf16")),
        Run("subspace-128x-adamw", "Subspace 128x (k=1 + token ids)", "baseline",
            ("bottleneck.method=subspace", "bottleneck.width=1", "bottleneck.wire_dtype=bf16")),
        Run("none-adamw-s2", "uncompressed", "control", seed=2),
        Run("resbm-128x-adamw-s2", "ResBM 128x (h=2)", "ratio", resbm(2), seed=2),
        Run("resbm-64x-tok-adamw", "ResBM 64x (h=3 + token ids, learned table)", "variant", resbm(3, *TOKENS)),
        Run("resbm-64x-adamw", "ResBM 64x (h=4)", "ratio", resbm(4)),
        Run("resbm-32x-adamw", "ResBM 32x (h=8)", "ratio", resbm(8)),
        Run("resbm-32x-tok-adamw", "ResBM 32x (h=7 + token ids, learned table)", "variant", resbm(7, *TOKENS)),
        Run("noskip-32x-adamw", "no-skip bottleneck 32x (h=8)", "baseline",
            ("bottleneck.method=bottleneck-noskip", "bottleneck.width=8", "bottleneck.wire_dtype=bf16")),
        Run("subspace-32x-adamw", "Subspace 32x (k=7 + token ids)", "baseline",
            ("bottleneck.method=subspace", "bottleneck.width=7", "bottleneck.wire_dtype=bf16")),
        Run("resbm-64x-tok-muon", "ResBM 64x (h=3 + token ids, learned table)", "variant", resbm(3, *TOKENS) + MUON),
        Run("resbm-32x-tok-muon", "ResBM 32x (h=7 + token ids, learned table)", "variant", resbm(7, *TOKENS) + MUON),
        Run("resbm-16x-adamw", "ResBM 16x (h=16)", "ratio", resbm(16)),
        Run("resbm-8x-adamw", "ResBM 8x (h=32)", "ratio", resbm(32)),
        Run("resbm-128x-mlp-adamw", "ResBM 128x (h=2), MLP decoder", "variant", resbm(2, "bottleneck.decoder=mlp")),
        Run("resbm-128x-frozen-adamw", "ResBM 128x (h=1 + token ids, frozen random table)", "variant",
            resbm(1, "bottleneck.token_channel=frozen")),
        Run("resbm-32x-int8-adamw", "ResBM 32x in bytes (h=14 int8 + scale, both ways)", "variant",
            resbm(14, "wire.codec=int8", "wire.codec_backward=true")),
        Run("resbm-128x-noid-adamw", "ResBM 128x (h=2), identity=none", "variant",
            resbm(2, "bottleneck.identity=none")),
    ]
    assert len({x.name for x in r}) == len(r)
    return r


RUNS = _runs()


# ---- running ------------------------------------------------------------------------------------

def resolve(run: Run, out: Path, settings=()):
    """The run's validated Config (raises ConfigError before anything starts)."""
    return load_config(CONFIG, run.all_overrides(out, settings)).validate(world_size=1)


def launch(run: Run, out: Path, timeout_s: int, env: dict, settings=()) -> tuple[int, float]:
    """One run in one process (no launcher: pipeline.stages=1), its own MASTER_PORT so parallel runs
    never collide."""
    cmd = [sys.executable, "-m", "resbm_ds.train", "--config", CONFIG, *run.all_overrides(out, settings)]
    return run_logged(cmd, out / "runs" / run.name, timeout_s, {**env, "MASTER_PORT": str(free_port())})


def analyse(run_dir: Path) -> dict:
    steps, vals = read_metrics(run_dir)
    tail = steps[-max(1, len(steps) // 10):]
    return dict(steps=len(steps), tokens=steps[-1]["tokens"], final_val_loss=vals[-1]["val_loss"],
                final_train_loss=sum(r["loss"] for r in tail) / len(tail),
                tokens_per_s=sum(r["tokens_per_s"] for r in steps[1:]) / max(1, len(steps) - 1),
                val_curve=[dict(step=v["step"], tokens=v["tokens"], val_loss=v["val_loss"]) for v in vals])


def resolved(cfg) -> dict:
    """The run's whole configuration, less what does not change what it trains (where it writes,
    trackers, checkpoint retention): what a reused result must match."""
    d = cfg.to_dict()
    for key in ("out_dir", "keep_last", "init_from"):
        d["train"].pop(key, None)
    d.pop("tracking", None)
    d["bottleneck"]["token_channel"] = cfg.token_channel   # "auto" resolved, so a new default cannot match
    return json.loads(json.dumps(d))                       # as results.json stores it (tuples -> lists)


def describe(run: Run, cfg, settings=()) -> dict:
    fwd, bwd = cfg.wire_bytes_per_token
    return dict(name=run.name, label=run.label, group=run.group, optimizer=run.optimizer, seed=run.seed,
                config=resolved(cfg),
                overrides=[*run.overrides, *settings], method=cfg.bottleneck.method, code_width=cfg.code_width,
                wire_bytes_per_token_fwd=fwd, wire_bytes_per_token_bwd=bwd,
                ratio_vs_bf16=cfg.compression_ratio("bf16"), ratio_vs_model=cfg.compression_ratio("model"),
                parameters=parameter_counts(cfg, num_stages=1).total)


def run_suite(out: Path, only: str | None = None, jobs: int = 2, fresh: bool = False,
              timeout_s: int = 3600, command: str = "", settings: tuple[str, ...] = ()) -> dict:
    """Train the suite's runs (those matching `only`), `jobs` at a time; `settings` are overrides
    for every run (e.g. a smaller model for a quick check), part of what a reused run must match."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in RUNS if not only or re.search(only, r.name)]
    configs = {r.name: resolve(r, out, settings) for r in runs}   # every run validated before any starts
    previous, first_started = {}, time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if (out / "results.json").exists() and not fresh:
        before = json.loads((out / "results.json").read_text())
        previous = {e["name"]: e for e in before.get("runs", [])}
        first_started = before.get("started", first_started)   # a resumed suite keeps its first start
    results = dict(suite="convergence", base_config=CONFIG, command=command, jobs=jobs,
                   started=first_started, machine=machine_info(),
                   runs=[e for e in previous.values() if e["name"] not in configs   # other runs of the suite
                         and any(e["name"] == r.name for r in RUNS)])
    entries = {}
    todo = []
    for r in runs:
        entry = describe(r, configs[r.name], settings)
        old = previous.get(r.name)
        if old and "config" not in old and old.get("status") == "ok":
            # written before configs were stored, when bottleneck.token_channel defaulted to none
            legacy = ("bottleneck.token_channel=none", *old["overrides"])
            old["config"] = resolved(resolve(Run(r.name, r.label, r.group, legacy, old["seed"]), out))
        if old and old.get("status") == "ok" and old.get("config") == entry["config"]:
            entries[r.name] = old
            print(f"[convergence] {r.name}: reused", flush=True)
        else:
            entries[r.name] = entry
            todo.append(r)
    lock = threading.Lock()

    def publish():
        results["runs"] = [e for e in results["runs"] if e["name"] not in entries] + \
            [entries[r.name] for r in runs]
        write_outputs(results, out)

    print(f"[convergence] {len(todo)} of {len(runs)} runs to train, {jobs} at a time -> {out}", flush=True)
    env = run_env()

    def work(r: Run):
        t0 = time.strftime("%H:%M:%S")
        print(f"[convergence] {t0} start {r.name}: {r.label} ({r.optimizer}, seed {r.seed})", flush=True)
        rc, wall = launch(r, out, timeout_s, env, settings)
        run_dir = out / "runs" / r.name
        e = entries[r.name]
        e["wall_s"] = wall
        if rc == 0 and (run_dir / METRICS_FILE).exists():
            e["status"], e["metrics"] = "ok", analyse(run_dir)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            msg = f"val loss {e['metrics']['final_val_loss']:.4f}, {e['metrics']['tokens_per_s']:,.0f} tok/s"
        else:
            tail = log_tail(run_dir, 20)
            e["status"], e["error"] = "failed", tail
            msg = f"FAILED (rc {rc}): {tail.splitlines()[-1] if tail else ''}"
        with lock:
            publish()
        print(f"[convergence] {time.strftime('%H:%M:%S')} done {r.name} in {wall:.0f} s: {msg}", flush=True)

    publish()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(work, todo))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    publish()
    print(f"[convergence] wrote {out / 'results.json'}, {out / 'results.md'} and plots", flush=True)
    return results


# ---- analysis -----------------------------------------------------------------------------------

def _ok(results):
    return [r for r in results["runs"] if r.get("status") == "ok"]


def control_of(entry: dict, ok: list[dict]) -> dict | None:
    """The same-optimizer, same-seed uncompressed run without extra tables."""
    return next((c for c in ok if c["group"] == "control" and c["optimizer"] == entry["optimizer"]
                 and c["seed"] == entry["seed"]), None)


def summarise(results: dict):
    ok = _ok(results)
    for e in ok:
        c = control_of(e, ok)
        loss = e["metrics"]["final_val_loss"]
        e["gap_pct"] = None if c is None else 100 * (loss / c["metrics"]["final_val_loss"] - 1)
    # seeds: runs whose settings match except the seed
    spreads = []
    by_settings = {}
    for e in ok:
        by_settings.setdefault((tuple(e["overrides"]), e["optimizer"]), []).append(e)
    for (_, opt), group in by_settings.items():
        if len(group) > 1:
            losses = [g["metrics"]["final_val_loss"] for g in group]
            gaps = [g["gap_pct"] for g in group if g.get("gap_pct") is not None and g["group"] != "control"]
            spreads.append(dict(label=group[0]["label"], optimizer=opt, seeds=[g["seed"] for g in group],
                                losses=losses, loss_spread=max(losses) - min(losses),
                                gaps_pct=gaps, gap_spread_pct=(max(gaps) - min(gaps)) if len(gaps) > 1 else None))
    results["seed_spread"] = spreads
    width_curve = sorted(((e["code_width"], e["gap_pct"], e["optimizer"]) for e in ok
                          if e["group"] == "ratio" and e["seed"] == 1234 and e.get("gap_pct") is not None))
    results["gap_vs_width"] = [dict(width=w, gap_pct=g, optimizer=o) for w, g, o in width_curve]


def write_outputs(results: dict, out: Path):
    summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)


def _f(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(results: dict) -> str:
    mach = results["machine"]
    ok = _ok(results)
    lines = ["# resbm-ds bench: suite `convergence`", "",
             "What compression costs in loss, at equal tokens, against the same-optimizer uncompressed "
             "control (same seed). Base config `bench-convergence` (H=256, 4 layers, 3 segments = 2 "
             "boundaries, 600 steps x 2,048 tokens, fp32 model with bf16 codes, one process per run).", ""]
    if results.get("command"):
        lines += ["Command:", "", f"    {results['command']}", ""]
    lines += [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, "
              f"{'GPU ' + mach['gpu'] if mach.get('gpu') else 'no GPU'}; torch {mach['torch']}, deepspeed "
              f"{mach['deepspeed']}; {results.get('jobs', 1)} runs at a time. Started {results['started']}"
              + (f", finished {results['finished']}." if results.get("finished") else " (unfinished)."), ""]
    lines += ["The uncompressed rows read 0.5x: an fp32 hidden state is twice a dense bf16 one.", ""]
    lines += ["| configuration | optimizer | seed | bytes/token fwd, bwd | ratio vs dense bf16 | parameters "
              "| val loss | gap vs uncompressed | tokens/s (1 core) |", "|---|---|---|---|---|---|---|---|---|"]
    order = {"control": 0, "ratio": 1, "variant": 2, "baseline": 3}
    for e in sorted(ok, key=lambda e: (e["optimizer"], order[e["group"]], -e["ratio_vs_bf16"], e["name"])):
        m = e["metrics"]
        gap = "(control)" if e["group"] == "control" else (_f(e.get("gap_pct"), "+.2f") + "%")
        lines.append(f"| {e['label']} | {e['optimizer']} | {e['seed']} | {e['wire_bytes_per_token_fwd']}, "
                     f"{e['wire_bytes_per_token_bwd']} | {e['ratio_vs_bf16']:.3g}x | {e['parameters']:,} | "
                     f"{m['final_val_loss']:.4f} | {gap} | {m['tokens_per_s']:,.0f} |")
    lines.append("")
    if results.get("seed_spread"):
        lines += ["Seed spread (same settings, different seed):", "",
                  "| configuration | optimizer | seeds | val losses | loss spread | gaps | gap spread |",
                  "|---|---|---|---|---|---|---|"]
        for s in results["seed_spread"]:
            lines.append(f"| {s['label']} | {s['optimizer']} | {s['seeds']} | "
                         f"{', '.join(f'{x:.4f}' for x in s['losses'])} | {s['loss_spread']:.4f} | "
                         f"{', '.join(f'{g:+.2f}%' for g in s['gaps_pct']) or '–'} | "
                         f"{_f(s['gap_spread_pct'], '.2f')}{'' if s['gap_spread_pct'] is None else ' pp'} |")
        lines.append("")
    if results.get("gap_vs_width"):
        lines += ["Gap against code width h (ResBM, bf16 codes, no token channel, H=256; the paper's 128x at "
                  "H=4096 is h=32):", "", "| h | ratio vs bf16 | optimizer | gap |", "|---|---|---|---|"]
        for p in results["gap_vs_width"]:
            lines.append(f"| {p['width']} | {256 // p['width']}x | {p['optimizer']} | {p['gap_pct']:+.2f}% |")
        lines.append("")
    missing = [r for r in results["runs"] if r.get("status") != "ok"]
    if missing:
        lines += ["Not (yet) run or failed: " + ", ".join(f"`{r['name']}` ({r.get('status', 'pending')})"
                                                         for r in missing), ""]
    lines += ["Reading: val loss is the last evaluation (8 batches of 8 x 128 validation tokens, the same "
              "batches for every run) after all 1.23M training tokens; the gap is val loss / control val "
              "loss - 1. Bytes per token are what the wire meter counts at a stage boundary (code, codec "
              "scale, token ids), from the formula the tests check against the meter.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in _ok(results) if e["seed"] == 1234]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    for ax, opt in zip(axes, ("adamw", "muon")):
        runs = [e for e in ok if e["optimizer"] == opt]
        cmap = plt.get_cmap("tab20")
        for i, e in enumerate(sorted(runs, key=lambda e: e["name"])):
            c = e["metrics"]["val_curve"]
            ax.plot([v["tokens"] / 1e6 for v in c], [v["val_loss"] for v in c], marker="o", markersize=2.5,
                    linewidth=2.2 if e["group"] == "control" else 1.2, color="black" if e["group"] == "control"
                    else cmap(i % 20), label=e["label"])
        ax.set(xlabel="training tokens (millions)", title=f"{opt}: validation loss vs tokens")
        ax.grid(alpha=0.3)
        if runs:
            ax.legend(fontsize=7)
            finals = [e["metrics"]["final_val_loss"] for e in runs]
            ax.set_ylim(min(finals) - 0.15, max(finals) + 1.2)
    axes[0].set_ylabel("validation loss")
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_tokens.png", dpi=120)
    plt.close(fig)

    pts = results.get("gap_vs_width", [])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for opt in ("adamw", "muon"):
        p = [x for x in pts if x["optimizer"] == opt]
        if p:
            ax.plot([x["width"] for x in p], [x["gap_pct"] for x in p], marker="o", label=opt)
    ax.axhline(3, color="grey", linestyle=":", linewidth=1, label="3% target")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="code width h (H=256; bf16 codes)", ylabel="val loss gap vs uncompressed (%)",
           title="ResBM: gap against code width")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gap_vs_width.png", dpi=120)
    plt.close(fig)


def main(args, command: str) -> int:
    """`python -m resbm_ds.bench --suite convergence ...` (arguments parsed by bench.main)."""
    problems = []
    if args.jobs < 1:
        problems.append(f"--jobs {args.jobs}: must be >= 1")
    if args.link or args.steps or args.keep_checkpoints:
        problems.append("--link, --steps and --keep-checkpoints are for the throughput suites; the convergence "
                        "suite has no link and a fixed token budget (use --set train.steps=N for a quick check)")
    if args.only:
        try:
            if not any(re.search(args.only, r.name) for r in RUNS):
                problems.append(f"--only {args.only!r} matches no run; runs: {[r.name for r in RUNS]}")
        except re.error as e:
            problems.append(f"--only {args.only!r}: not a regular expression ({e})")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        run_suite(Path(args.out), only=args.only, jobs=args.jobs, fresh=args.fresh, command=command,
                  settings=tuple(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
