"""`python -m resbm_ds.bench --suite sites --out DIR`: data parallelism across two sites on a real
shaped link (resbm_ds/netem.py), for each outer method of resbm_ds/sync.py, side by side.

Two network namespaces are the two sites, joined by one tbf-shaped veth link (full duplex). The 2
cores hold one process per site, so each site is one process (`pipeline.stages=1`: the stage
boundaries stay in the model, their losses equal a 2-stage pipeline's, tests/test_core_pipeline.py)
of the convergence suite's model and its resbm-tok boundary (bench-convergence, ResBM 128x: h=1 + int16 ids,
learned tables; its tuned lr).

  allreduce   synchronous data parallelism: one DeepSpeed world of 2 processes, one per site
              (`torchrun --nnodes 2`), every gradient all-reduced across the link every step
  diloco      each site its own world; every sync.inner_steps (30) steps the pseudo-gradients are
              averaged across the link and an outer Nesterov step is taken (lr 0.7, momentum 0.9)
  sparseloco  the same, each site sending the top 64 of every 4,096 values at 2 bits, with error feedback

Every method trains LOSS_STEPS steps (2 sites x 2,048 tokens per step: 1.23M tokens) for the loss at
equal tokens (allreduce on the fast link: the same arithmetic as on the slow one, which it would take
hours to cross), and TIMING_STEPS steps on each link for tokens/s. Bytes between sites are the meter's
(`wire_bytes_sites`, sync.py's formula; allreduce: the all-reduce's ring formula, the meter counts only
what crosses stages and sites) and the kernel's (the link interface's counters, less TCP/IP headers).

DIR/results.json (machine, command, rates, every run), DIR/results.md (the table), DIR/runs/<run>/.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .. import netem
from ..cli import ConfigError
from ..config import REPO_ROOT, load_config
from ..metrics import METRICS_FILE, read_metrics
from ..model.accounting import parameter_counts
from ..system import free_port
from .convergence import CONFIG, LR_FAMILIES
from . import engine
from .runner import fmt, log_tail, machine_info, run_env, write_results

FAMILY = "resbm-tok"                  # ResBM 128x, h=1 + int16 ids, learned tables, at its tuned lr (results/convergence)
LR = 2e-3
FAST, SLOW = "10gbit", "80mbit"
LOSS_STEPS, TIMING_STEPS = 300, 60
METHODS = {
    "allreduce": ("synchronous data parallelism (one world across the sites)", ()),
    "diloco": ("DiLoCo (H=30, outer Nesterov lr 0.7, momentum 0.9)", ("sync.method=diloco",)),
    "sparseloco": ("SparseLoCo (H=30, top 64 / 4,096 at 2 bits, error feedback)", ("sync.method=sparseloco",)),
}


def overrides(method: str, steps: int, out: Path) -> list[str]:
    return [*LR_FAMILIES[FAMILY][1], f"train.lr={LR:g}", f"train.steps={steps}", "train.log_every=1",
            f"train.eval_every={steps}", f"train.save_every={steps}", *METHODS[method][1], f"train.out_dir={out}"]


def commands(cluster: netem.Cluster, method: str, o: list[str]) -> list[list[str]]:
    """One launcher per site, inside its namespace."""
    train = ["-m", "resbm_ds.train", "--config", CONFIG]
    if method == "allreduce":     # one world: node k is a rank of it
        port = free_port()
        return [netem.torchrun_command(cluster, k, port, [*train, *[x.replace("{k}", "") for x in o]])
                for k in range(2)]
    sync = ["sync.sites=2", f"sync.master_addr={cluster.address(0)}", f"sync.master_port={free_port()}"]
    return [cluster.exec_prefix(k) + [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *train,
        *[x.replace("{k}", str(k)) for x in o], *sync, f"sync.site_rank={k}"] for k in range(2)]


def analyse(site_dirs: list[Path]) -> dict:
    """Tokens/s of the whole run (every site's tokens over the wall time of steps 2..N), bytes between
    sites per step (meter: every site's wire_bytes_sites; kernel: site 0's interface, both directions,
    less TCP/IP headers: all of the link's traffic), the final validation loss (site 0)."""
    per_site = [read_metrics(d) for d in site_dirs]
    steps0, vals0 = per_site[0]
    steady = [r for r in steps0 if r["step"] > 1]
    time_s = sum(r["step_time_s"] for r in steady)
    tokens = sum(sum(r["tokens_per_s"] * r["step_time_s"] for r in steps if r["step"] > 1) for steps, _ in per_site)
    meter = sum(sum(r.get("wire_bytes_sites", 0) for r in steps) for steps, _ in per_site)
    payload = sum(sum(netem.payload_bytes(r)) for r in steps0)
    n = len(steps0)
    return dict(steps=n, tokens=steps0[-1]["tokens"] * len(site_dirs), tokens_per_s=tokens / time_s,
                meter_bytes_per_step=meter / n, kernel_payload_per_step=payload / n,
                kernel_bytes_per_step=sum(r["net_tx_bytes"] + r["net_rx_bytes"] for r in steps0) / n,
                final_val_loss=vals0[-1]["val_loss"] if vals0 else None)


def allreduce_bytes_per_step(cfg) -> int:
    """A ring all-reduce of the fp32 gradients over 2 ranks: each sends 2 (n-1)/n x 4 bytes per
    parameter, both ranks together 4 bytes per parameter x 2 (the meter's sum over sites)."""
    c = parameter_counts(cfg.spec, num_stages=1)
    return 2 * 4 * (c.total - c.frozen)


class Sites(engine.Suite):
    """The suite on the engine: each method's loss run and timing runs, one at a time, every site's
    launcher inside its namespace."""
    tag = "sites"

    def __init__(self, out: Path, fresh: bool, rates: dict, steps: int | None, settings: tuple[str, ...],
                 command: str, timeout_s: int = 4 * 3600):
        loss_steps, timing_steps = (steps, steps) if steps else (LOSS_STEPS, TIMING_STEPS)
        specs = []
        for method in METHODS:
            loss_link = rates["fast"] if method == "allreduce" else rates["slow"]
            runs = [(loss_link, loss_steps)] + [(link, timing_steps) for link in (rates["slow"], rates["fast"])
                                                if (link, timing_steps) != (loss_link, loss_steps)]
            specs += [engine.Spec(f"{method}-{'fast' if link == FAST else 'slow'}-{n}", (method, link, n), select=method)
                      for link, n in runs]
        super().__init__(out, specs, fresh)
        self.rates, self.loss_steps, self.settings, self.command, self.timeout_s = rates, loss_steps, settings, command, timeout_s
        self.cluster = self.cfg = None

    def validate(self, specs):
        """Every run's config, before any starts (ConfigError)."""
        self.cfg = load_config(CONFIG, [*overrides("allreduce", self.loss_steps, self.out / "x"), *self.settings]
                               ).validate(world_size=2)
        for method, _, steps in (s.run for s in specs):
            sync = [] if method == "allreduce" else ["sync.sites=2"]
            load_config(CONFIG, [*overrides(method, steps, self.out / "x"), *self.settings, *sync]).validate(
                world_size=2 if method == "allreduce" else 1)

    def entry(self, spec, done):
        method, link, steps = spec.run
        o = [*overrides(method, steps, self.run_dir(spec) / "site{k}"), *self.settings]
        return dict(name=spec.name, method=method, label=METHODS[method][0], link=link, steps=steps, overrides=o)

    def launch(self, spec, entry, launcher):
        (method, link, steps), run_dir, o = spec.run, self.run_dir(spec), entry["overrides"]
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        self.cluster.set_rate(link)
        self.say(f"{spec.name}: {METHODS[method][0]}, {steps} steps at {link}")
        logs = [open(run_dir / f"site{k}.log", "w") for k in range(2)]
        t0 = time.perf_counter()
        rcs = netem.run_nodes(commands(self.cluster, method, o), logs, netem.node_env(run_env()), self.timeout_s,
                              cwd=REPO_ROOT, started=launcher.started)
        for f in logs:
            f.close()
        entry["wall_s"] = time.perf_counter() - t0
        (run_dir / "log.txt").write_text("".join(f"---- site {k}\n" + (run_dir / f"site{k}.log").read_text()
                                                 for k in range(2)))
        sites = [run_dir / ("site" if method == "allreduce" else f"site{k}") for k in range(2)]
        if any(rcs) or not all((s / METRICS_FILE).exists() for s in sites[:1 if method == "allreduce" else 2]):
            entry.update(status="failed", error=log_tail(run_dir, 40))
            self.say(f"{spec.name}: FAILED (exit {rcs})\n{entry['error'][-1500:]}")
            return entry
        entry.update(status="ok", metrics=analyse(sites[:1] if method == "allreduce" else sites))
        for s in sites:
            shutil.rmtree(s / "checkpoints", ignore_errors=True)
        m = entry["metrics"]
        self.say(f"{spec.name}: {m['tokens_per_s']:,.0f} tok/s, {m['meter_bytes_per_step']:,.0f} B/step between "
                 f"sites (kernel payload {m['kernel_payload_per_step']:,.0f}), val loss {m['final_val_loss']:.4f}")
        return entry

    def header(self):
        return dict(suite="sites", base_config=CONFIG, family=FAMILY, lr=LR, command=self.command, rates=self.rates,
                    started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine_info(),
                    allreduce_formula_bytes_per_step=allreduce_bytes_per_step(self.cfg), runs=[])

    @contextmanager
    def session(self):
        with netem.Cluster(2, [self.rates["fast"]], cluster_id=f"s{os.getpid()}") as self.cluster:
            yield

    def publish(self, results):
        write_results(results, self.out, markdown)


def main(args, command: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rates = {"slow": SLOW, "fast": FAST}
    for item in args.link:
        key, _, value = item.partition("=")
        try:
            netem.rate_bps(value)
        except netem.NetemError:
            value = ""
        if key not in rates or not value:
            print(f"error: --link {item}: the sites suite takes slow=RATE or fast=RATE (tc units: 80mbit)", file=sys.stderr)
            return 2
        rates[key] = value
    try:
        if not args.plan:
            netem.check_support()
    except netem.NetemError as e:
        print(f"error: the sites suite needs a real network: {e}", file=sys.stderr)
        return 2
    suite = Sites(out, args.fresh, rates, args.steps, tuple(args.set), command)
    try:
        if args.plan:
            engine.run(suite, only=args.only, show_plan=True)
            return 0
        results = engine.run(suite, only=args.only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


def markdown(results: dict) -> str:
    ok = [r for r in results["runs"] if r["status"] == "ok"]
    rates = results["rates"]
    loss = {r["method"]: r for r in ok if r["steps"] == max(x["steps"] for x in ok)} if ok else {}
    speed = {(r["method"], r["link"]): r["metrics"]["tokens_per_s"] for r in ok
             if r["steps"] == min(x["steps"] for x in ok) or (r["method"], r["link"]) not in
             {(x["method"], x["link"]) for x in ok if x is not r}}
    ref = loss.get("allreduce")
    ar_bytes = results["allreduce_formula_bytes_per_step"]
    mach = results["machine"]
    lines = ["# resbm-ds bench: suite `sites` (data parallelism across 2 sites on a real shaped link)", "",
             "Command:", "", f"    {results['command']}", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; torch {mach['torch']}, "
             f"deepspeed {mach['deepspeed']}. Started {results['started']}"
             + (f", finished {results['finished']}." if results.get("finished") else " (unfinished)."), "",
             f"Two sites (network namespaces) joined by one full-duplex tbf link: slow {rates['slow']}, fast "
             f"{rates['fast']}. One process per site (pipeline.stages=1), model `{results['base_config']}` with "
             f"the boundary of `{results['family']}` (ResBM 128x, h=1 + int16 ids, learned tables; lr {results['lr']:g}). Allreduce's ring moves "
             f"{ar_bytes:,} bytes per step between the two ranks (formula).", "",
             "| method | bytes between sites per step (meter) | kernel payload per step | allreduce / this | "
             f"tokens/s at {rates['slow']} | at {rates['fast']} | slow / fast | tokens | val loss | vs allreduce |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, (label, _) in METHODS.items():
        runs = [r for r in ok if r["method"] == method]
        if not runs:
            continue
        m = (loss.get(method) or runs[0])["metrics"]
        meter = ar_bytes if method == "allreduce" else m["meter_bytes_per_step"]
        slow, fast = speed.get((method, rates["slow"])), speed.get((method, rates["fast"]))
        vl = loss[method]["metrics"]["final_val_loss"] if method in loss else None
        gap = (100 * (vl / ref["metrics"]["final_val_loss"] - 1)) if vl and ref and method != "allreduce" else None
        lines.append(f"| {label} | {fmt(meter)} | {fmt(m['kernel_payload_per_step'])} | "
                     f"{fmt(ar_bytes / meter if meter else None, ',.0f')}x | {fmt(slow)} | {fmt(fast)} | "
                     f"{fmt(slow / fast if slow and fast else None, '.3f')} | {fmt(m['tokens'])} | {fmt(vl, '.4f')} | "
                     f"{fmt(gap, '+.2f')}{'%' if gap is not None else ''} |")
    failed = [r["name"] for r in results["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed: " + ", ".join(failed)]
    lines += ["", "Bytes per step are averaged over every step of the loss run (an outer method sends only every "
              "30th step). Kernel payload: the link interface's bytes in both directions less 66 bytes of "
              "Ethernet/IP/TCP headers per packet, as counted by site 0's kernel; it includes the rendezvous."]
    return "\n".join(lines) + "\n"
