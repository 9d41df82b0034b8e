"""The convergence suite: what compression costs in loss, `python -m resbm_ds.bench --suite convergence`.

Every run trains the same model (resbm_ds/configs/bench-convergence.yaml: H=256, 4 layers, 3 segments
so 2 boundaries) on the same corpus, tokenizer and data order, in one
process (`pipeline.stages=1`; the losses equal the 2-stage ones, tests/test_core_pipeline.py). Runs
differ only in the boundary, its width, the optimizer, the lr, the wire codec, the seed and the
horizon. `--jobs` runs go at once (default 2: one per core of the 2-core box).

The evaluation is the whole validation split (about 158k tokens of every source and document,
`train.eval_batches=0`), the same tokens for every run, every 125 steps (256k tokens); results.json
carries its size, its unigram and bigram cross-entropies (bench/reference.py) and a loss per source.

Phases, in the order they run (an interrupted suite has the early phases first):
  sweep   each family (LR_FAMILIES) at every lr of LRS (and EXTRA_LRS), seed 1234, the short horizon (600 steps,
          1.23M tokens). A family's tuned lr is the sweep's best; later runs of the family use it,
          and wait for it.
  long    the headline trio at 3,000 steps (6.1M tokens): the uncompressed model with the same
          token tables (the fair control), ResBM 128x with ids sent and learned tables, ResBM at 128x
          without ids.
  seeds   seeds 2 and 3 of every headline family at the short horizon (seed 1234 is the sweep's).
  default the default boundary (DEFAULT) at seeds 2 and 3, then at 3,000 steps.
  rest    the gap against h, Subspace, the side channel variants, Muon, the codecs and extras, at the
          short horizon and the tuned lr of their family; then seeds 2 and 3 of the side-channel
          and code candidates (CHANNEL_PAIRS).
  warmup  the lrs at which no-skip and identity=none collapse, again with a warmup of LONG_WARMUP steps.

Bytes are counted as the paper counts them: the ratio is a dense bf16 boundary's bytes per token per
direction (2H = 512 at H=256) over the bytes sent per token in the busier direction, code plus codec
scale plus token ids (`Config.wire_bytes_per_token`, which tests/test_wire_bytes.py checks against
the wire meter). "128x" allows 4 bytes per token: h=2 in bf16 (with token tables whose ids are read
on each stage, the default), or h=1 in bf16 plus an int16 id. A wire codec acts on every boundary, in
one process too (engine.codec_inside_stages).

Outputs in DIR: results.json, results.md, val_loss_vs_tokens.png, long_gap_vs_tokens.png,
gap_vs_width.png and runs/<name>/ (metrics.jsonl, config.yaml, log.txt). A run checkpoints every 125
steps; a suite stopped by SIGINT/SIGTERM stops its runs (each saves first), and the next start into
the same DIR resumes them from their checkpoints and reuses finished runs with the same settings.
`--only REGEX` runs a subset (a run whose family lr is not yet tuned waits for, or is skipped
without, its sweep).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..cli import ConfigError
from ..config import load_config
from ..metrics import METRICS_FILE, read_metrics
from ..model.accounting import parameter_counts
from ..run_dir import config_changes
from ..system import free_port
from . import engine
from .engine import Spec, Suite
from .reference import eval_reference
from .runner import log_tail, machine_info, run_env

CONFIG = "bench-convergence"
LRS = (1e-3, 2e-3, 4e-3)
# Families whose sweep goes lower too: the boundaries without an identity path collapse to the
# unigram loss from 2e-3 up (their only path across a boundary is the h=2 code), which leaves 1e-3 at
# the grid's edge.
EXTRA_LRS = {"noskip": (5e-4,), "noid": (5e-4,)}


def family_lrs(family: str) -> tuple[float, ...]:
    return tuple(sorted((*LRS, *EXTRA_LRS.get(family, ()))))


# Whether warmup is what those families lack at 2e-3 and up: their collapsing lrs again, with a warmup
# five times the base config's 30 steps (phase `warmup`; not part of the lr sweep).
LONG_WARMUP = 150
SEEDS = (1234, 2, 3)
LONG_STEPS = 3000
COLLAPSED = 0.3      # a run ending within this many nats of the unigram loss learned token frequencies only
MUON = ("train.optimizer=muon", "train.muon_ns_method=gram")   # Gram NS runs in fp32 on a CPU
# The suite's token tables send their ids unless a run says token_ids=local (a later override wins).
TOKENS = ("bottleneck.token_channel=learned", "bottleneck.token_ids=sent")
HASHED512 = ("bottleneck.token_channel=hashed", "bottleneck.token_buckets=512", "bottleneck.token_ids=sent")
HASHED128_LOCAL = ("bottleneck.token_channel=hashed", "bottleneck.token_buckets=128", "bottleneck.token_ids=local")
LOWRANK_LOCAL = ("bottleneck.token_channel=lowrank", "bottleneck.token_ids=local")


def resbm(width: int, *extra: str) -> tuple[str, ...]:
    """A ResBM run with every boundary switch spelled out (`extra` overrides them), so a change of
    the defaults never changes what a run of this suite means."""
    explicit = {"init": "identity", "decoder": "linear", "decoder_norm": "rms", "token_channel": "none",
                "token_ids": "sent"}
    for e in extra:
        explicit.pop(e.split("=")[0].removeprefix("bottleneck."), None)
    return ("bottleneck.method=resbm", f"bottleneck.width={width}", "bottleneck.wire_dtype=bf16",
            *(f"bottleneck.{k}={v}" for k, v in explicit.items()), *extra)


# Boundaries without an identity path send one constant code from the first steps unless the token
# embedding starts large (model/boundary.py, init): their runs start it at N(0, 1).
NO_IDENTITY = ("model.embed_std=1.0",)


def noskip(width: int) -> tuple[str, ...]:
    """SWARM's no-skip bottleneck; the decoder reads the code itself (a LayerNorm over 2 values keeps 1 bit)."""
    return ("bottleneck.method=bottleneck-noskip", f"bottleneck.width={width}", "bottleneck.wire_dtype=bf16",
            "bottleneck.decoder_norm=none", *NO_IDENTITY)


# The families whose lr the sweep tunes: key -> (label, overrides).
LR_FAMILIES = {
    "none-tok": ("uncompressed + the same token tables (fair control)", ("bottleneck.method=none", *TOKENS)),
    "resbm-tok": ("ResBM 128x, h=1 + int16 ids sent, learned tables", resbm(1, *TOKENS)),
    "resbm": ("ResBM 128x without ids (h=2)", resbm(2)),
    "none": ("uncompressed", ()),
    "noskip": ("no-skip bottleneck 128x (h=2)", noskip(2)),
    "noid": ("ResBM 128x (h=2), identity=none, decoder reads b",
             resbm(2, "bottleneck.identity=none", "bottleneck.decoder_norm=none", *NO_IDENTITY)),
}
HEADLINE = ("none-tok", "resbm-tok", "resbm", "none")     # the families of the headline pairs
LONG = ("none-tok", "resbm-tok", "resbm")                # the long-horizon trio
# (compressed, control, what the comparison says)
PAIRS = (("resbm-tok", "none-tok", "ResBM 128x, h=1 + ids sent, learned tables, against the fair control (same tables)"),
         ("resbm", "none", "ResBM 128x without ids against the uncompressed model"),
         ("resbm-tok", "none", "ResBM 128x, h=1 + ids sent, learned tables, against the uncompressed model without "
          "tables (not fair)"),
         ("none-tok", "none", "what the token tables alone do to the uncompressed model"))
# Side-channel and code candidates for the default (issue #23) at the short horizon, each with seeds 2
# and 3 (runs named <run>-s<seed>): (compressed, control, what the comparison says). A control that is
# a tuned family (LR_FAMILIES) uses that family's seeds.
CHANNEL_PAIRS = (("resbm-128x-hashed512-local", "none-hashed512",
                  "ResBM 128x, hashed 512-row tables, ids read locally, against the same tables uncompressed"),
                 ("resbm-128x-hashed512", "none-hashed512",
                  "ResBM 128x, hashed 512-row tables, ids sent, against the same tables uncompressed"),
                 ("resbm-128x-int4-local", "none-hashed512",
                  "ResBM 128x, h=4 int4 both ways + hashed 512-row tables with ids read locally, against the same "
                  "tables uncompressed"),
                 ("resbm-128x-local", "none-tok",
                  "the default: ResBM 128x, h=2 + tables of one row per id, ids read locally, against the same "
                  "tables uncompressed"),
                 ("resbm-128x-lowrank-local-normal", "none-lowrank",
                  "ResBM 128x, h=2 + rank-32 tables (second factor from N(0, init_std)) with ids read locally, against "
                  "the same tables uncompressed"),
                 ("resbm-128x-int4", "none", "ResBM 128x, h=4 int4 both ways, no ids, against the uncompressed model"),
                 ("resbm-128x-int2", "none", "ResBM 128x, h=8 int2 both ways, no ids, against the uncompressed model"))


# The default boundary (bottleneck.token_channel=auto, token_ids=auto) at 128x on this model: h=2 bf16
# and a hashed 4,096-row table, which at V=4,096 is the learned table read at the id, with the ids
# read locally. Spelled out, so a later change of the defaults does not change what the run means.
DEFAULT = ("bottleneck.token_channel=learned", "bottleneck.token_ids=local")
DEFAULT_LABEL = "ResBM 128x default (h=2 + ids read locally, one table row per id)"


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    phase: str                        # sweep | long | seeds | rest | warmup
    family: str                       # its lr comes from this family's sweep (unless lr is set)
    overrides: tuple[str, ...] = ()
    seed: int = 1234
    lr: float | None = None
    steps: int | None = None          # None: the base config's (600, the short horizon)

    @property
    def optimizer(self) -> str:
        return "muon" if "train.optimizer=muon" in self.overrides else "adamw"

    def all_overrides(self, out: Path, lr: float, settings=()) -> list[str]:
        steps = [f"train.steps={self.steps}"] if self.steps else []
        return [*self.overrides, *steps, *settings, f"train.lr={lr:g}", f"seed={self.seed}",
                f"train.out_dir={out / 'runs' / self.name}"]


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _runs() -> list[Run]:
    """In priority order: the sweep of the long trio's families, the long trio, the rest of the
    sweep, the seeds, the default's seeds and its long run, the rest, the other candidates' seeds, then
    the warmup check."""
    fam = LR_FAMILIES
    sweep = [Run(f"{f}@lr{_lr_tag(lr)}", fam[f][0], "sweep", f, fam[f][1], lr=lr) for f in fam for lr in family_lrs(f)]
    long = [Run(f"{f}-long", fam[f][0], "long", f, fam[f][1], steps=LONG_STEPS) for f in LONG]
    seeds = [Run(f"{f}-s{s}", fam[f][0], "seeds", f, fam[f][1], seed=s) for f in HEADLINE for s in SEEDS[1:]]
    warmup = [Run(f"{f}@lr{_lr_tag(lr)}-warmup{LONG_WARMUP}", f"{fam[f][0]}, warmup {LONG_WARMUP} steps", "warmup", f,
                  (*fam[f][1], f"train.warmup_steps={LONG_WARMUP}"), lr=lr) for f in EXTRA_LRS for lr in (2e-3, 4e-3)]
    four_bytes = ("wire.codec_backward=true",)          # sub-8-bit codes: 4 bytes per token both ways
    rest = [
        *[Run(f"resbm-{256 // w}x", f"ResBM {256 // w}x (h={w})", "rest", "resbm", resbm(w)) for w in (4, 8, 16, 32)],
        Run("noskip-32x", "no-skip bottleneck 32x (h=8)", "rest", "noskip", noskip(8)),
        Run("subspace-128x", "Subspace 128x (k=1 + token ids)", "rest", "resbm-tok",
            ("bottleneck.method=subspace", "bottleneck.width=1", "bottleneck.wire_dtype=bf16")),
        # side channels and codes at 128x (issue #23): what the default could be
        Run("resbm-128x-table-normal", "ResBM 128x (h=1 + ids, learned table from N(0, init_std))", "rest",
            "resbm-tok", resbm(1, *TOKENS, "bottleneck.table_init=normal")),
        Run("resbm-128x-local", DEFAULT_LABEL, "rest", "resbm-tok", resbm(2, *TOKENS, *DEFAULT)),
        # 512 rows = V/8: the pressure the default's 4,096 rows meet at V=32,000 (at V=4,096 they are the
        # learned table, one row per id)
        Run("resbm-128x-hashed512", "ResBM 128x (h=1 + ids, hashed 512-row table)", "rest", "resbm-tok",
            resbm(1, *HASHED512)),
        Run("resbm-128x-hashed512-local", "ResBM 128x (h=2 + ids read locally, hashed 512-row table)", "rest",
            "resbm-tok", resbm(2, *HASHED512, "bottleneck.token_ids=local")),
        Run("none-hashed512", "uncompressed + the same hashed 512-row tables (their fair control)", "rest", "none-tok",
            ("bottleneck.method=none", *HASHED512)),
        Run("resbm-128x-lowrank", "ResBM 128x (h=1 + ids, rank-32 table)", "rest", "resbm-tok",
            resbm(1, "bottleneck.token_channel=lowrank")),
        Run("resbm-128x-frozen", "ResBM 128x (h=1 + ids, frozen random table)", "rest", "resbm-tok",
            resbm(1, "bottleneck.token_channel=frozen")),
        # the rank-32 table in the default's form (h=2, ids read locally): its init and lr, and its control
        *[Run(f"resbm-128x-lowrank-local{tag}", f"ResBM 128x (h=2 + ids read locally, rank-32 table{what})", "rest",
              "resbm-tok", resbm(2, *LOWRANK_LOCAL, *extra), lr=lr)
          for tag, what, extra, lr in (
              ("", "", (), None),
              ("-normal", ", second factor from N(0, init_std)", ("bottleneck.table_init=normal",), None),
              ("-normal@lr4e-3", ", second factor from N(0, init_std), lr 4e-3", ("bottleneck.table_init=normal",), 4e-3))],
        Run("none-lowrank", "uncompressed + the same rank-32 tables, second factor from N(0, init_std) (their fair "
            "control)", "rest", "none-tok", ("bottleneck.method=none", *LOWRANK_LOCAL, "bottleneck.table_init=normal")),
        Run("none-muon", "uncompressed, Muon", "rest", "none", MUON),
        Run("resbm-tok-muon", LR_FAMILIES["resbm-tok"][0] + ", Muon", "rest", "resbm-tok", resbm(1, *TOKENS) + MUON),
        Run("resbm-muon", LR_FAMILIES["resbm"][0] + ", Muon", "rest", "resbm", resbm(2) + MUON),
        Run("none-tok-muon", LR_FAMILIES["none-tok"][0] + ", Muon", "rest", "none-tok",
            LR_FAMILIES["none-tok"][1] + MUON),
        Run("resbm-128x-int4", "ResBM 128x (h=4 int4 + scale)", "rest", "resbm", resbm(4, "wire.codec=int4", *four_bytes)),
        Run("resbm-128x-int2", "ResBM 128x (h=8 int2 + scale)", "rest", "resbm", resbm(8, "wire.codec=int2", *four_bytes)),
        Run("resbm-128x-int4-local", "ResBM 128x (h=4 int4 + scale, ids read locally, hashed 512-row table)",
            "rest", "resbm-tok", resbm(4, *HASHED512, "bottleneck.token_ids=local", "wire.codec=int4", *four_bytes)),
        Run("resbm-128x-mlp", "ResBM 128x (h=2), MLP decoder", "rest", "resbm", resbm(2, "bottleneck.decoder=mlp")),
        Run("resbm-32x-int8", "ResBM 32x in bytes (h=14 int8 + scale, both ways)", "rest", "resbm",
            resbm(14, "wire.codec=int8", "wire.codec_backward=true")),
        Run("none-tok-embed1", "uncompressed + tables, token embedding N(0, 1) (the init check)", "rest",
            "none-tok", (*LR_FAMILIES["none-tok"][1], *NO_IDENTITY)),
        Run("resbm-tok-embed1", "ResBM 128x default, token embedding N(0, 1) (the init check)", "rest",
            "resbm-tok", (*LR_FAMILIES["resbm-tok"][1], *NO_IDENTITY)),
        # 128 rows = V/32: the pressure the default's 4,096 rows meet at V=128,256 (Llama 3)
        Run("resbm-128x-hashed128-local", "ResBM 128x (h=2 + ids read locally, hashed 128-row table)", "rest",
            "resbm-tok", resbm(2, *HASHED128_LOCAL)),
        Run("none-hashed128", "uncompressed + the same hashed 128-row tables (their fair control)", "rest", "none-tok",
            ("bottleneck.method=none", *HASHED128_LOCAL)),
    ]
    seeded = {name for pair in CHANNEL_PAIRS for name in pair[:2]}
    channel_seeds = [replace(r, name=f"{r.name}-s{s}", seed=s) for r in rest if r.name in seeded for s in SEEDS[1:]]
    default_seeds = [r for r in channel_seeds if r.name.startswith("resbm-128x-local-s")]
    default_long = Run("resbm-128x-local-long", DEFAULT_LABEL, "long", "resbm-tok", resbm(2, *TOKENS, *DEFAULT),
                       steps=LONG_STEPS)
    order = ([r for r in sweep if r.family in LONG] + long + [r for r in sweep if r.family not in LONG] + seeds
             + default_seeds + [default_long] + rest + [r for r in channel_seeds if r not in default_seeds] + warmup)
    assert len({x.name for x in order}) == len(order)
    return order


RUNS = _runs()


# ---- running ------------------------------------------------------------------------------------

def tuned_lr(family: str, entries: dict) -> float | None:
    """The family's best sweep lr (lowest final val loss), once every lr of its sweep finished."""
    sweep = [e for e in entries.values() if e.get("phase") == "sweep" and e.get("family") == family]
    if len(sweep) < len(family_lrs(family)) or any(e.get("status") != "ok" for e in sweep):
        return None
    return min(sweep, key=lambda e: e["metrics"]["final_val_loss"])["lr"]


def resolve(run: Run, out: Path, lr: float, settings=()):
    """The run's validated Config (raises ConfigError before anything starts)."""
    return load_config(CONFIG, run.all_overrides(out, lr, settings)).validate(world_size=1)


def analyse(run_dir: Path) -> dict:
    steps, vals = read_metrics(run_dir)
    tail = steps[-max(1, len(steps) // 10):]
    return dict(steps=len(steps), tokens=steps[-1]["tokens"], final_val_loss=vals[-1]["val_loss"],
                final_val_by_source=vals[-1].get("val_loss_by_source"), eval_tokens=vals[-1].get("eval_tokens"),
                final_train_loss=sum(r["loss"] for r in tail) / len(tail),
                tokens_per_s=sum(r["tokens_per_s"] for r in steps[1:]) / max(1, len(steps) - 1),
                max_grad_norm=max((r["grad_norm"] or 0) for r in steps),
                val_curve=[dict(step=v["step"], tokens=v["tokens"], val_loss=v["val_loss"],
                                by_source=v.get("val_loss_by_source")) for v in vals])


def resolved(cfg) -> dict:
    """The run's whole configuration, less what does not change what it trains (where it writes,
    trackers, checkpoint retention): what a reused result must match."""
    d = cfg.to_dict()
    for key in ("out_dir", "keep_last", "init_from"):
        d["train"].pop(key, None)
    d.pop("tracking", None)
    d.pop("runtime", None)
    return json.loads(json.dumps(d))                       # as results.json stores it (tuples -> lists)


def describe(run: Run, cfg, lr: float, settings=()) -> dict:
    fwd, bwd = cfg.wire_bytes_per_token
    return dict(name=run.name, label=run.label, phase=run.phase, family=run.family, optimizer=run.optimizer,
                seed=run.seed, lr=lr, config=resolved(cfg), overrides=[*run.overrides, *settings],
                method=cfg.bottleneck.method, code_width=cfg.code_width,
                wire_bytes_per_token_fwd=fwd, wire_bytes_per_token_bwd=bwd,
                ratio_vs_bf16=cfg.compression_ratio("bf16"), ratio_vs_model=cfg.compression_ratio("model"),
                parameters=parameter_counts(cfg.spec, num_stages=1).total)


class Convergence(Suite):
    """The suite on the engine: runs wait for their family's lr sweep, a stopped run resumes, and
    finished runs are kept in results.json (a reused run must match its whole resolved config)."""
    tag = "convergence"
    resumes = True

    def __init__(self, out: Path, runs: list[Run], fresh: bool, settings: tuple[str, ...], command: str,
                 jobs: int, timeout_s: int):
        super().__init__(out, [Spec(r.name, r, waits_for=f"the {r.family} sweep") for r in runs], fresh)
        self.settings, self.command, self.jobs, self.timeout_s = settings, command, jobs, timeout_s
        self.env = run_env()
        self.before = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}

    def validate(self, specs):
        for s in specs:
            resolve(s.run, self.out, s.run.lr or LRS[0], self.settings)

    def entry(self, spec, done):
        run = spec.run
        lr = run.lr if run.lr is not None else tuned_lr(run.family, done)
        return None if lr is None else describe(run, resolve(run, self.out, lr, self.settings), lr, self.settings)

    def note(self, spec, entry):
        return f"lr {entry['lr']:g}"

    def carried(self):
        labels = {r.name: r.label for r in RUNS}
        before = [*self.before.get("runs", []), *self.before.get("diverged", [])]
        runs = {e["name"]: e for e in before if e.get("phase") and e["name"] in labels}
        for e in runs.values():
            e["label"] = labels[e["name"]]   # the suite's current wording
            e.get("config", {}).get("bottleneck", {}).setdefault("token_ids", "sent")   # saved before the key: sent
        return runs

    def previous(self, spec):
        return self.carried().get(spec.name)

    def same(self, old, entry):
        return "config" in old and not config_changes(old["config"], entry["config"])

    def record(self, spec, entry):
        pass                                        # results.json keeps every run

    def launch(self, spec, entry, launcher):
        run, run_dir, lr = spec.run, self.run_dir(spec), entry["lr"]
        cmd = [sys.executable, "-m", "resbm_ds.train", "--config", CONFIG,
               *run.all_overrides(self.out, lr, self.settings), *(["--resume"] if launcher.resume else [])]
        rc, wall = launcher.run(cmd, run_dir, self.timeout_s, {**self.env, "MASTER_PORT": str(free_port())})
        entry["wall_s"] = wall + (launcher.old.get("wall_s", 0) if launcher.resume else 0)
        stopped = rc in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)   # exit code or signal
        if rc == 0 and (run_dir / METRICS_FILE).exists():
            entry["status"], entry["metrics"] = "ok", analyse(run_dir)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            msg = f"val loss {entry['metrics']['final_val_loss']:.4f}, {entry['metrics']['tokens_per_s']:,.0f} tok/s"
        elif stopped and (run_dir / METRICS_FILE).exists() and read_metrics(run_dir)[1]:
            entry["status"], entry["metrics"] = "partial", analyse(run_dir)
            msg = f"stopped at {entry['metrics']['tokens']:,} tokens (saved; the next start resumes it)"
        elif stopped:                               # before its first evaluation: nothing to analyse yet
            entry["status"] = "stopped"
            msg = "stopped before its first evaluation (saved; the next start resumes it)"
        else:
            tail = log_tail(run_dir, 20)
            entry["status"], entry["error"] = "failed", tail
            msg = f"FAILED (rc {rc}): {tail.splitlines()[-1] if tail else ''}"
        self.say(f"{time.strftime('%H:%M:%S')} {run.name} after {wall:.0f} s: {msg}")
        return entry

    def header(self):
        first_started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        if not self.fresh:
            first_started = self.before.get("started", first_started)   # a resumed suite keeps its first start
        results = dict(suite="convergence", version=2, base_config=CONFIG, command=self.command, jobs=self.jobs,
                       started=first_started, machine=machine_info(),
                       eval=eval_reference(load_config(CONFIG, list(self.settings)).validate(world_size=1)))
        ev = results["eval"]
        self.say(f"evaluation: {ev['tokens']:,} tokens; unigram {ev['unigram_ce']:.3f}, bigram {ev['bigram_ce']:.3f} nats")
        return results

    def publish(self, results):
        write_outputs(results, self.out)


def run_suite(out: Path, only: str | None = None, jobs: int = 2, fresh: bool = False,
              timeout_s: int = 4 * 3600, command: str = "", settings: tuple[str, ...] = (),
              show_plan: bool = False) -> dict | None:
    """Train the suite's runs (those matching `only`), `jobs` at a time; `settings` are overrides
    for every run (e.g. a smaller model for a quick check), part of what a reused run must match."""
    runs = [r for r in RUNS if not only or re.search(only, r.name)]
    return engine.run(Convergence(out, runs, fresh, settings, command, jobs, timeout_s), jobs=jobs,
                      show_plan=show_plan)


# ---- analysis -----------------------------------------------------------------------------------

def _ok(results, status=("ok",)):
    return [r for r in results["runs"] if r.get("status") in status]


def _finished(results) -> dict[str, dict]:
    """Every finished run by name, diverged or not."""
    return {e["name"]: e for e in [*_ok(results), *results.get("diverged", [])]}


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def tuned_runs(results: dict, family: str) -> dict[int, dict]:
    """{seed: run} of the family at its tuned lr, short horizon, AdamW: the sweep's best (seed 1234)
    and the seed runs."""
    entries = _finished(results)
    lr = tuned_lr(family, entries)
    if lr is None:
        return {}
    return {e["seed"]: e for e in entries.values() if e["family"] == family and e["lr"] == lr
            and e["phase"] in ("sweep", "seeds") and e["optimizer"] == "adamw"}


def seeded_runs(results: dict, name: str) -> dict[int, dict]:
    """{seed: run} of a side-channel run of the rest phase: seed 1234 is `name`, the others `name-s<seed>`."""
    entries = {e["name"]: e for e in _ok(results)}
    runs = {1234: entries.get(name), **{s: entries.get(f"{name}-s{s}") for s in SEEDS[1:]}}
    return {s: e for s, e in runs.items() if e is not None}


def compare(what: str, comp: str, ctrl: str, a: dict[int, dict], c: dict[int, dict]) -> dict | None:
    """The gap of `a` against `c` over their common seeds, with the suite's verdict rule."""
    seeds = sorted(set(a) & set(c))
    if not seeds:
        return None
    la = [a[s]["metrics"]["final_val_loss"] for s in seeds]
    lc = [c[s]["metrics"]["final_val_loss"] for s in seeds]
    gaps = [100 * (x / y - 1) for x, y in zip(la, lc)]
    (ma, sa), (mc, sc) = _mean_std(la), _mean_std(lc)
    mg, sg = _mean_std(gaps)
    combined = math.hypot(sa, sc) if sa is not None and sc is not None else None
    verdict = ("one seed: no verdict" if combined is None else
               "different" if abs(ma - mc) > 2 * combined else "not distinguishable")
    return dict(compressed=comp, control=ctrl, what=what, seeds=seeds, loss=la, control_loss=lc,
                mean=ma, std=sa, control_mean=mc, control_std=sc, gaps_pct=gaps, gap_mean_pct=mg,
                gap_std_pct=sg, combined_std=combined, verdict=verdict)


def summarise(results: dict):
    unigram = results["eval"]["unigram_ce"]
    # by name: the engine republishes `runs` with every run, diverged ones too, into the same results
    every = list({e["name"]: e for e in [*results.get("diverged", []), *results["runs"]]}.values())
    for e in every:
        if e.get("metrics"):
            e["below_unigram_by"] = unigram - e["metrics"]["final_val_loss"]
    # An lr-sweep or warmup-check run that ends within COLLAPSED of the unigram loss learned token
    # frequencies only: its training diverged at that lr. Such points are why a family's lr is what it
    # is; they are kept apart, under `diverged`, so that `runs` holds the runs that trained (a run of
    # another phase that did not learn stays there, a failure tests/test_results.py reports).
    diverged = [e for e in every if e.get("status") == "ok" and e["phase"] in ("sweep", "warmup")
                and e["below_unigram_by"] < COLLAPSED]
    results["runs"] = [e for e in every if not any(e is d for d in diverged)]
    results["diverged"] = diverged
    results.pop("collapsed", None)                 # a results.json from before `diverged` held this summary
    entries = _finished(results)
    ok = list(entries.values())
    results["sweep"] = {f: dict(label=LR_FAMILIES[f][0], tuned_lr=tuned_lr(f, entries),
                                val_loss={f"{e['lr']:g}": e["metrics"]["final_val_loss"] for e in ok
                                          if e["phase"] == "sweep" and e["family"] == f})
                        for f in LR_FAMILIES}
    pairs = [compare(what, comp, ctrl, tuned_runs(results, comp), tuned_runs(results, ctrl))
             for comp, ctrl, what in PAIRS]
    pairs += [compare(what, comp, ctrl, seeded_runs(results, comp),
                      tuned_runs(results, ctrl) if ctrl in LR_FAMILIES else seeded_runs(results, ctrl))
              for comp, ctrl, what in CHANNEL_PAIRS]
    results["pairs"] = [p for p in pairs if p]
    long = {e["name"].removesuffix("-long"): e for e in _ok(results, ("ok", "partial")) if e["phase"] == "long"}
    results["long_gaps"] = []
    if "none-tok" in long:
        ctrl = {v["tokens"]: v["val_loss"] for v in long["none-tok"]["metrics"]["val_curve"]}
        for name, e in long.items():
            if name != "none-tok":
                curve = [dict(tokens=v["tokens"], val_loss=v["val_loss"], control=ctrl[v["tokens"]],
                              gap_pct=100 * (v["val_loss"] / ctrl[v["tokens"]] - 1))
                         for v in e["metrics"]["val_curve"] if v["tokens"] in ctrl]
                results["long_gaps"].append(dict(compressed=name, label=e["label"], control="none-tok", curve=curve))
    base = tuned_runs(results, "none").get(1234)
    widths = [tuned_runs(results, "resbm").get(1234)] + [e for e in ok if re.fullmatch(r"resbm-\d+x", e["name"])]
    results["gap_vs_width"] = [] if base is None else sorted(
        (dict(width=e["code_width"], gap_pct=100 * (e["metrics"]["final_val_loss"] / base["metrics"]["final_val_loss"] - 1))
         for e in widths if e is not None), key=lambda x: x["width"])


def write_outputs(results: dict, out: Path):
    summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out)


def _f(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(results: dict) -> str:
    mach, ev = results["machine"], results["eval"]
    unigram = ev["unigram_ce"]

    def marked(v):                                  # a loss, starred where the run diverged
        return _f(v, ".4f") + ("*" if v is not None and v > unigram - COLLAPSED else "")

    lines = ["# resbm-ds bench: suite `convergence` (v2)", "",
             "What compression costs in loss, at equal tokens. Base config `bench-convergence` (H=256, 4 layers, "
             "3 segments = 2 boundaries, fp32 model with bf16 codes, AdamW unless marked, one process "
             "per run); short horizon 600 steps x 2,048 tokens = 1.23M tokens, long horizon 3,000 steps = 6.1M.", ""]
    if results.get("command"):
        lines += ["Command:", "", f"    {results['command']}", ""]
    lines += [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, "
              f"{'GPU ' + mach['gpu'] if mach.get('gpu') else 'no GPU'}; torch {mach['torch']}, deepspeed "
              f"{mach['deepspeed']}; {results.get('jobs', 1)} runs at a time. Started {results['started']}"
              + (f", finished {results['finished']}." if results.get("finished") else " (unfinished)."), ""]
    lines += [f"Evaluation: the whole validation split, {ev['tokens']:,} tokens, the same for every run. "
              f"Unigram cross-entropy **{ev['unigram_ce']:.3f}** (a model that learned only frequencies), "
              f"bigram **{ev['bigram_ce']:.3f}** ({ev['bigram_model']}; counts from {ev['counts_from']})."]
    if ev.get("by_source"):
        lines += ["", "| source | tokens | unigram | bigram |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['tokens']:,} | {v['unigram_ce']:.3f} | {v['bigram_ce']:.3f} |"
                  for k, v in ev["by_source"].items()]
    lines.append("")
    if results.get("pairs"):
        lines += ["## Pairs (short horizon, tuned lr, seeds)", "",
                  "Gap = val loss / control val loss - 1, per seed; two methods are called different only when "
                  "their mean losses differ by more than twice the combined std.", "",
                  "| comparison | seeds | loss (mean ± std) | control (mean ± std) | gap mean ± std | verdict |",
                  "|---|---|---|---|---|---|"]
        for p in results["pairs"]:
            lines.append(f"| {p['what']} | {len(p['seeds'])} | {p['mean']:.4f} ± {_f(p['std'], '.4f')} | "
                         f"{p['control_mean']:.4f} ± {_f(p['control_std'], '.4f')} | "
                         f"{p['gap_mean_pct']:+.2f}% ± {_f(p['gap_std_pct'], '.2f')} | {p['verdict']} |")
        lines.append("")
    if results.get("long_gaps"):
        lines += ["## Long horizon: gap against the fair control along the run", "",
                  "| tokens | " + " | ".join(g["compressed"] for g in results["long_gaps"]) + " |",
                  "|---|" + "---|" * len(results["long_gaps"])]
        by_tokens = {}
        for g in results["long_gaps"]:
            for c in g["curve"]:
                by_tokens.setdefault(c["tokens"], {})[g["compressed"]] = c["gap_pct"]
        for t in sorted(by_tokens):
            lines.append(f"| {t / 1e6:.2f}M | " + " | ".join(_f(by_tokens[t].get(g["compressed"]), "+.2f") + "%"
                                                          for g in results["long_gaps"]) + " |")
        lines.append("")
    if results.get("sweep"):
        grid = sorted({lr for f in results["sweep"] for lr in family_lrs(f)})
        lines += ["## Learning-rate sweep (short horizon, seed 1234, AdamW)", "",
                  f"A loss marked * is within {COLLAPSED:g} of the unigram loss ({unigram:.3f}): training diverged at "
                  "that lr and the model learned token frequencies only (results.json `diverged`; kept as sweep "
                  "points, used in no comparison).", "",
                  "| family | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | tuned |", "|---|" + "---|" * (len(grid) + 1)]
        for f, sw in results["sweep"].items():
            cells = [sw["val_loss"].get(f"{lr:g}") for lr in grid]
            lines.append(f"| {sw['label']} | " + " | ".join(marked(v) for v in cells) + f" | {_f(sw['tuned_lr'], 'g')} |")
        lines.append("")
    warm = sorted((e for e in [*_ok(results), *results.get("diverged", [])] if e["phase"] == "warmup"),
                  key=lambda e: (e["family"], e["lr"]))
    if warm:
        lines += [f"## Warmup check: the lrs where a family diverged, with {LONG_WARMUP} warmup steps instead of 30", "",
                  f"| family | lr | val loss, warmup 30 (sweep) | val loss, warmup {LONG_WARMUP} |", "|---|---|---|---|"]
        for e in warm:
            v30 = results["sweep"].get(e["family"], {}).get("val_loss", {}).get(f"{e['lr']:g}")
            lines.append(f"| {LR_FAMILIES[e['family']][0]} | {e['lr']:g} | {marked(v30)} | "
                         f"{marked(e['metrics']['final_val_loss'])} |")
        lines.append("")
    lines += ["## Every run", "", "| run | configuration | optimizer | lr | seed | tokens | bytes/token fwd, bwd | "
              "ratio vs dense bf16 | parameters | val loss | below unigram | max grad norm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted([*_ok(results, ("ok", "partial")), *results.get("diverged", [])], key=lambda e: (e["phase"], e["name"])):
        m = e["metrics"]
        lines.append(f"| {e['name']}{' (partial)' if e['status'] == 'partial' else ''} | {e['label']} | "
                     f"{e['optimizer']} | {e['lr']:g} | {e['seed']} | {m['tokens'] / 1e6:.2f}M | "
                     f"{e['wire_bytes_per_token_fwd']}, {e['wire_bytes_per_token_bwd']} | {e['ratio_vs_bf16']:.3g}x | "
                     f"{_f(e['parameters'], ',')} | {m['final_val_loss']:.4f} | {e['below_unigram_by']:+.3f} | "
                     f"{m['max_grad_norm']:.3g} |")
    lines.append("")
    if results.get("gap_vs_width"):
        lines += ["Gap against code width h (ResBM, bf16 codes, no ids, tuned lr of `resbm`, against the "
                  "uncompressed model at its tuned lr; the paper's 128x at H=4096 is h=32):", "",
                  "| h | ratio vs bf16 | gap |", "|---|---|---|"]
        lines += [f"| {p['width']} | {256 // p['width']}x | {p['gap_pct']:+.2f}% |" for p in results["gap_vs_width"]]
        lines.append("")
    missing = [r for r in results["runs"] if r.get("status") not in ("ok", "partial")]
    if missing:
        lines += ["Failed: " + ", ".join(f"`{r['name']}`" for r in missing), ""]
    lines += ["Reading: val loss is the last evaluation of a run, over the whole validation split; "
              "'below unigram' is the eval's unigram cross-entropy minus that loss (a run that learned "
              "beyond frequencies is well above 0). Bytes per token are what the wire meter counts at a "
              "stage boundary (code, codec scale, token ids), from the formula the tests check against the "
              "meter. The max grad norm is the largest pre-clip gradient norm of any step.", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = results["eval"]

    def references(ax):
        ax.axhline(ev["unigram_ce"], color="grey", linestyle=":", linewidth=1, label=f"unigram {ev['unigram_ce']:.2f}")
        ax.axhline(ev["bigram_ce"], color="grey", linestyle="--", linewidth=1, label=f"bigram {ev['bigram_ce']:.2f}")

    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    cmap = plt.get_cmap("tab10")
    short = [tuned_runs(results, f).get(1234) for f in LR_FAMILIES]
    long = [e for e in _ok(results, ("ok", "partial")) if e["phase"] == "long"]
    for ax, runs, title in ((axes[0], [e for e in short if e], "short horizon, tuned lr, seed 1234"),
                            (axes[1], long, "long horizon")):
        for i, e in enumerate(sorted(runs, key=lambda e: e["name"])):
            c = e["metrics"]["val_curve"]
            ax.plot([v["tokens"] / 1e6 for v in c], [v["val_loss"] for v in c], marker="o", markersize=2.5,
                    color=cmap(i), label=f"{e['label']} (lr {e['lr']:g})")
        references(ax)
        ax.set(xlabel="training tokens (millions)", title=f"validation loss: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats)")
    fig.tight_layout()
    fig.savefig(out / "val_loss_vs_tokens.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in results.get("long_gaps", []):
        ax.plot([c["tokens"] / 1e6 for c in g["curve"]], [c["gap_pct"] for c in g["curve"]], marker="o",
                label=g["label"])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xlabel="training tokens (millions)", ylabel="val loss gap vs fair control (%)",
           title="long horizon: gap against the uncompressed model with the same tables")
    ax.grid(alpha=0.3)
    if results.get("long_gaps"):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "long_gap_vs_tokens.png", dpi=120)
    plt.close(fig)

    pts = results.get("gap_vs_width", [])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if pts:
        ax.plot([x["width"] for x in pts], [x["gap_pct"] for x in pts], marker="o", label="adamw")
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set(xlabel="code width h (H=256; bf16 codes)", ylabel="val loss gap vs uncompressed (%)",
           title="ResBM: gap against code width")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_width.png", dpi=120)
    plt.close(fig)


def main(args, command: str) -> int:
    """`python -m resbm_ds.bench --suite convergence ...` (arguments parsed by bench.main)."""
    problems = []
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
                  settings=tuple(args.set), show_plan=args.plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
