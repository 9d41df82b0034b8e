"""`python -m resbm_ds.bench --suite paper-net --out DIR`: the paper's throughput comparison on a real
network (resbm_ds/netem.py), side by side with the in-process link emulator (resbm_ds/wire/link.py).

Every configuration trains twice on the same 2-stage model (base config bench-paper-cpu):
  real:      2 network namespaces joined by a tbf-shaped veth link; one `torchrun --nnodes 2
             --node_rank K` per namespace (one pipeline stage per node), gloo over real TCP; the
             trainer records the link interface's kernel counters per step.
  emulated:  both stages on 127.0.0.1 with wire.link_bandwidth_mbps at the same rate. The real link
             is full duplex (one tbf per direction), so the emulator runs with
             wire.link_full_duplex=true: the same link, modelled.

The runs, in order: uncompressed on the fast link (the reference; repeated at the end to show how
much the shared machine's load drifted), uncompressed on the slow link, then ResBM ~100x and 128x,
ResBM 128x with the token-id side channel, and ResBM 128x through the int8 codec, on the slow link.
Ratios are bytes against a dense bf16 boundary (REFERENCE section 8): 128x = 8 bytes per token
forward at H=512 (h=4 bf16; h=3 bf16 + int16 ids; h=6 int8 + a bf16 scale); this fp32 model's own
uncompressed boundary sends 2,048, so it is 256x against the uncompressed run.

The slow rate gives the paper's compute-to-link ratio on this machine: the paper's centralised
tokens/s is 12.4x its uncompressed link bound (7,530 / 609 tokens/s at 80 Mbit/s), so the rate is
chosen such that the first fast uncompressed run's tokens/s is 12.4x the uncompressed link bound
(half duplex, the paper's accounting). `--link slow=MBPS` fixes it instead.

DIR/results.json (machine, command, rate, every run), DIR/results.md (the table), DIR/runs/<run>/.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .. import netem
from ..config import REPO_ROOT, Config, load_config
from ..metrics import METRICS_FILE, read_metrics
from ..wire.link import link_bound_tokens_per_s
from ..system import free_port
from . import engine
from .runner import children_cpu_s, fmt, log_tail, machine_info, run_env, write_results
from .throughput import PAPER_COMPUTE_OVER_LINK, Link, analyse

BASE = "bench-paper-cpu"
FAST = "10gbit"
# every run: no evaluation until the end, a row per step
COMMON = ("train.eval_every=1000000", "train.eval_batches=2", "train.log_every=1", "train.warmup_steps=2")
STEPS, SLOW_UNCOMPRESSED_STEPS = 10, 4   # the slow uncompressed run takes ~12x longer per step
PLAIN = ("bottleneck.token_channel=none",)

# name, label, link (fast|slow), overrides
CONFIGS = [
    ("none-fast", "uncompressed (centralised baseline)", "fast", ("bottleneck.method=none",)),
    ("none-slow", "uncompressed (decentralised baseline)", "slow", ("bottleneck.method=none",)),
    ("resbm-102x", "ResBM 102x (h=5 bf16)", "slow",
     ("bottleneck.method=resbm", "bottleneck.width=5", "bottleneck.wire_dtype=bf16", *PLAIN)),
    ("resbm-128x", "ResBM 128x (h=4 bf16)", "slow",
     ("bottleneck.method=resbm", "bottleneck.width=4", "bottleneck.wire_dtype=bf16", *PLAIN)),
    ("resbm-128x-tokens", "ResBM 128x + token ids (h=3 bf16 + int16 id)", "slow",
     ("bottleneck.method=resbm", "bottleneck.width=3", "bottleneck.wire_dtype=bf16",
      "bottleneck.token_channel=learned", "bottleneck.token_ids=sent")),
    ("resbm-128x-int8", "ResBM 128x, int8 codec (h=6 int8 + bf16 scale)", "slow",
     ("bottleneck.method=resbm", "bottleneck.width=6", "wire.codec=int8", "wire.codec_backward=true", *PLAIN)),
    ("none-fast-end", "uncompressed (centralised baseline), again at the end", "fast", ("bottleneck.method=none",)),
]
MODES = ("real", "emulated")


def slow_rate_mbps(compute_tokens_per_s: float, dense_bytes_per_token_both_ways: float) -> float:
    """The rate whose uncompressed (half-duplex) link bound is compute / PAPER_COMPUTE_OVER_LINK."""
    bound = compute_tokens_per_s / PAPER_COMPUTE_OVER_LINK
    return bound * dense_bytes_per_token_both_ways * 8 / 1e6


class PaperNet(engine.Suite):
    """The suite on the engine: every configuration real then emulated, one at a time; the slow
    link's rate is --link slow=MBPS, or measured by the first real run (none-fast-real)."""

    def __init__(self, out: Path, fresh: bool, steps: int | None, settings: tuple[str, ...], fixed: float | None,
                 command: str, timeout_s: int = 1500):
        specs = [engine.Spec(f"{c[0]}-{mode}", (c, mode), select=c[0],
                             waits_for="the rate measured by none-fast-real" if c[2] == "slow" else "")
                 for c in CONFIGS for mode in MODES]
        super().__init__(out, specs, fresh)
        self.steps, self.settings, self.fixed, self.command, self.timeout_s = steps, settings, fixed, command, timeout_s
        self.cluster, self.rate_said = None, False

    def slow_rate(self, done: dict) -> float | None:
        if self.fixed or "none-fast-real" not in done:
            return self.fixed
        m = done["none-fast-real"]["metrics"]
        return slow_rate_mbps(m["tokens_per_s"], m["bytes_per_token_fwd"] + m["bytes_per_token_bwd"])

    def entry(self, spec, done):
        (name, _, link_key, overrides), mode = spec.run
        mbps = self.slow_rate(done)
        if link_key == "slow" and mbps is None:
            raise engine.Abort("the slow rate comes from the fast uncompressed run (none-fast), which did not "
                               "finish; pass --link slow=MBPS")
        steps = self.steps or (SLOW_UNCOMPRESSED_STEPS if name == "none-slow" else STEPS)
        tc_rate = FAST if link_key == "fast" else f"{mbps:.4g}mbit"
        if mode == "emulated":
            link_o = [f"wire.link_bandwidth_mbps={10_000.0 if link_key == 'fast' else mbps}", "wire.link_latency_ms=0",
                      "wire.link_full_duplex=true"]
        else:
            link_o = ["wire.link_bandwidth_mbps=null", "wire.link_latency_ms=0"]
        o = [*COMMON, f"train.steps={steps}", *overrides, *self.settings, *link_o]
        return dict(name=name, mode=mode, link=link_key, rate=tc_rate,
                    link_mbps=10_000.0 if link_key == "fast" else mbps, overrides=o)

    def note(self, spec, entry):
        return f"rate {entry['rate']}"

    def launch(self, spec, entry, launcher):
        (name, _, link_key, _), mode = spec.run
        run_dir, o = self.run_dir(spec), entry["overrides"]
        if link_key == "slow" and not self.fixed and not self.rate_said:
            self.rate_said = True
            self.say(f"slow link: {entry['link_mbps']:.3g} Mbit/s gives the paper's compute / link bound of "
                     f"{PAPER_COMPUTE_OVER_LINK:.1f} at the fast uncompressed run's tokens/s")
        cfg = load_config(BASE, o).validate(world_size=2)
        train = ["-m", "resbm_ds.train", "--config", BASE, f"train.out_dir={run_dir / 'run'}", *o]
        cpu0, load0 = children_cpu_s(), os.getloadavg()[0]
        if mode == "real":
            self.cluster.set_rate(entry["rate"])
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            logs = [open(run_dir / f"node{k}.log", "w") for k in range(2)]
            rcs = netem.launch(self.cluster, train, logs, env=run_env(), timeout_s=self.timeout_s, cwd=REPO_ROOT,
                               started=launcher.started)
            for f in logs:
                f.close()
            wall, rc = time.perf_counter() - t0, max(rcs, key=abs)
            (run_dir / "log.txt").write_text("".join((run_dir / f"node{k}.log").read_text() for k in range(2)))
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", *train]
            rc, wall = launcher.run(cmd, run_dir, self.timeout_s, run_env())
        entry.update(wall_s=wall, cpu_s=children_cpu_s() - cpu0, load_average=[load0, os.getloadavg()[0]])
        if rc != 0 or not (run_dir / "run" / METRICS_FILE).exists():
            entry.update(status="failed", error=log_tail(run_dir)[-3000:])
            self.say(f"{spec.name}: failed\n{entry['error'][-1500:]}")
            return entry
        m = analyse(run_dir / "run", cfg, Link(link_key, entry["rate"], entry["link_mbps"]))
        m.update(link_numbers(run_dir / "run", cfg, entry["link_mbps"]))
        entry.update(status="ok", metrics=m, config_ratio_vs_bf16=cfg.compression_ratio())
        shutil.rmtree(run_dir / "run" / "checkpoints", ignore_errors=True)
        self.say(f"{spec.name}: {m['tokens_per_s']:,.0f} tok/s, half-duplex bound {m['bound_half_duplex']:,.0f}"
                 + (f", kernel above TCP - meter {m['kernel_extra_per_step']:,.0f} B/step"
                    if m.get("kernel_extra_per_step") is not None else ""))
        return entry

    def header(self):
        return dict(suite="paper-net", base_config=BASE, command=self.command,
                    started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine=machine_info(),
                    paper_compute_over_link=PAPER_COMPUTE_OVER_LINK, runs=[])

    def publish(self, results):
        labels = {c[0]: c[1] for c in CONFIGS}
        for r in results["runs"]:
            r["label"] = labels[r["name"]]
        done = {f"{r['name']}-{r['mode']}": r for r in results["runs"] if r["status"] == "ok"}
        results["slow_rate_mbps"], results["slow_rate_from"] = self.slow_rate(done), "--link" if self.fixed else "measured"
        write_results(results, self.out, markdown)

    @contextmanager
    def session(self):
        with netem.Cluster(2, [FAST], cluster_id=f"b{os.getpid()}") as self.cluster:
            yield

    def finish(self, results):
        results["machine"]["load_average_end"] = list(os.getloadavg())
        results["torn_down"] = not netem.namespaces(self.cluster.cluster_id)



def link_numbers(run_dir: Path, cfg: Config, mbps: float) -> dict:
    """Link bounds (half and full duplex) from the meter's bytes; the kernel's view where recorded."""
    steps, _ = read_metrics(run_dir)
    steady = steps[1:] or steps
    tokens = steady[0]["tokens"] // steady[0]["step"]
    fwd, bwd = steady[-1]["wire_bytes_fwd"], steady[-1]["wire_bytes_bwd"]
    m = dict(bound_half_duplex=link_bound_tokens_per_s(tokens, fwd + bwd, mbps),
             bound_full_duplex=link_bound_tokens_per_s(tokens, max(fwd, bwd), mbps),
             bytes_per_token_fwd=fwd / tokens, bytes_per_token_bwd=bwd / tokens)
    if "net_tx_bytes" in steady[0]:
        payload = [sum(netem.payload_bytes(r)) for r in steady]
        meter = [r["wire_bytes_fwd"] + r["wire_bytes_bwd"] + r["wire_bytes_other"] for r in steady]
        wire = [r["net_tx_bytes"] + r["net_rx_bytes"] for r in steady]
        m.update(kernel_bytes_per_step=sum(wire) / len(wire), kernel_payload_per_step=sum(payload) / len(payload),
                 meter_bytes_per_step=sum(meter) / len(meter),
                 kernel_extra_per_step=(sum(payload) - sum(meter)) / len(payload),
                 kernel_over_meter=sum(wire) / sum(meter))
    return m


def main(args, command: str) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if any(s.startswith("wire.link_full_duplex") for s in args.set):
        print("error: paper-net's real link is full duplex (one tbf per direction); the emulator runs with "
              "wire.link_full_duplex=true to match, so --set wire.link_full_duplex is refused", file=sys.stderr)
        return 2
    fixed = None
    for item in args.link:
        key, _, value = item.partition("=")
        try:
            fixed = float(value)
        except ValueError:
            fixed = None
        if key != "slow" or fixed is None or fixed <= 0:
            print(f"error: --link {item}: paper-net takes --link slow=MBPS (its fast link is {FAST})", file=sys.stderr)
            return 2
    suite = PaperNet(out, args.fresh, args.steps, tuple(args.set), fixed, command)
    if args.plan:
        engine.run(suite, only=args.only, show_plan=True)
        return 0
    try:
        netem.check_support()
    except netem.NetemError as e:
        print(f"error: paper-net needs a real network: {e}", file=sys.stderr)
        return 2
    try:
        results = engine.run(suite, only=args.only)
    except engine.Abort as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if all(r["status"] == "ok" for r in results["runs"]) else 1


def _load(run) -> str:
    load = (run or {}).get("load_average")
    return "–" if not load else f"{load[0]:.1f}-{load[1]:.1f}"


def markdown(results: dict) -> str:
    mach, runs = results["machine"], results["runs"]
    by = {(r["name"], r["mode"]): r for r in runs if r["status"] == "ok"}
    refs = {mode: [by[(n, mode)]["metrics"]["tokens_per_s"] for n in ("none-fast", "none-fast-end") if (n, mode) in by]
            for mode in MODES}
    ref = {mode: (sum(v) / len(v) if v else None) for mode, v in refs.items()}
    rate = results.get("slow_rate_mbps")
    lines = ["# resbm-ds bench: suite `paper-net` (real shaped link vs the in-process emulator)", "",
             "Command:", "", f"    {results['command']}", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, no GPU, shared with other "
             f"work (load average at start {', '.join(f'{x:.1f}' for x in mach['load_average'])}"
             + (f", at end {', '.join(f'{x:.1f}' for x in mach['load_average_end'])}" if mach.get("load_average_end")
                else "") + f"); {mach['os']}; torch {mach['torch']}, deepspeed {mach['deepspeed']}.",
             f"Started {results['started']}" + (f", finished {results['finished']}." if results.get("finished")
                                                 else " (unfinished)."), "",
             f"Model: base config `{results['base_config']}` (H=512, 4 layers, 2 stages, fp32, 2,048 tokens per "
             f"step); {STEPS} steps per run ({SLOW_UNCOMPRESSED_STEPS} for the slow uncompressed run), tokens/s "
             "over steps 2..N. Fast link: 10 Gbit/s. Slow link: "
             + (f"{rate:.3g} Mbit/s ({results.get('slow_rate_from')}: the paper's compute / link bound of "
                f"{results['paper_compute_over_link']:.1f} for the uncompressed model)." if rate else "not run."), "",
             "| configuration | link | bytes/token fwd / bwd | vs dense bf16 | real: tokens/s | real: vs fast "
             "uncompressed | link bound half / full duplex | real: vs half-duplex bound | kernel above TCP - meter "
             "(B/step) | emulator: tokens/s | emulator: vs fast uncompressed | machine load (real; emulated) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label, link_key, _ in CONFIGS:
        real, emu = by.get((name, "real")), by.get((name, "emulated"))
        if not (real or emu):
            continue
        any_run = real or emu
        m = any_run["metrics"]
        rm, em = (real or {}).get("metrics"), (emu or {}).get("metrics")
        link = "10 Gbit/s" if link_key == "fast" else f"{any_run['link_mbps']:.3g} Mbit/s"
        lines.append(
            f"| {label} | {link} | {m['bytes_per_token_fwd']:g} / {m['bytes_per_token_bwd']:g} | "
            f"{fmt(m.get('measured_compression_vs_bf16'), '.1f')}x | {fmt(rm and rm['tokens_per_s'])} | "
            f"{fmt(rm and ref['real'] and rm['tokens_per_s'] / ref['real'], '.3f')} | "
            f"{fmt(m['bound_half_duplex'])} / {fmt(m['bound_full_duplex'])} | "
            f"{fmt(rm and rm['tokens_per_s'] / rm['bound_half_duplex'], '.3f')} | "
            f"{fmt(rm and rm.get('kernel_extra_per_step'))} | {fmt(em and em['tokens_per_s'])} | "
            f"{fmt(em and ref['emulated'] and em['tokens_per_s'] / ref['emulated'], '.3f')} | "
            f"{_load(real)}; {_load(emu)} |")
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed: " + ", ".join(f"{r['name']} ({r['mode']})" for r in failed)]
    lines += ["", "Columns: bytes/token as counted by the wire meter (resbm_ds/wire/meter.py) per direction; "
              "'vs fast uncompressed' divides by the mean of the two fast uncompressed runs of the same mode (start "
              f"and end: real {', '.join(f'{x:,.0f}' for x in refs['real'])}, emulated "
              f"{', '.join(f'{x:,.0f}' for x in refs['emulated'])} tokens/s); link bounds are tokens per step over "
              "(forward + backward bytes, or the busier direction's) x 8 / rate; 'kernel above TCP - meter' is the "
              "link interface's bytes less 66 B of Ethernet/IP/TCP header per packet, less the meter's bytes, per "
              "step (gloo's framing, retransmissions); machine load: the 1-minute load average at the start and "
              "end of each run, on 2 cores shared with other jobs (compute slows under load, the link does not)."]
    return "\n".join(lines) + "\n"
