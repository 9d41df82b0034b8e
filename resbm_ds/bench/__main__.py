"""`python -m resbm_ds.bench --suite NAME --out DIR`: the throughput suites (smoke, paper-cpu;
throughput.py), the convergence suite (convergence.py) and paper-net, the throughput comparison on a
real shaped network (network.py) and sites (sites.py), all on one engine (engine.py). `--list` shows
the throughput suites; `--plan` what a start into --out would do with each run of a suite."""
from __future__ import annotations

import sys
from pathlib import Path

from ..cli import ArgumentParser, cli, int_at_least, output_dir
from . import convergence, network, sites
from .throughput import SUITES, Link, check_available, replace_link, run_suite


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m resbm_ds.bench", description="resbm-ds benchmark suites")
    p.add_argument("--suite", required=False, choices=sorted([*SUITES, "convergence", "paper-net", "sites"]),
                   help="convergence: what compression costs in loss (resbm_ds/bench/convergence.py); "
                        "paper-net: throughput on a real shaped link, needs root (resbm_ds/bench/network.py); "
                        "sites: data parallelism across 2 sites on a real shaped link, needs root (resbm_ds/bench/sites.py)")
    p.add_argument("--jobs", type=int_at_least(1), default=2, help="convergence: runs at a time (one process each)")
    p.add_argument("--out", type=output_dir, help="output directory")
    p.add_argument("--only", help="run only the runs whose name matches this regular expression")
    p.add_argument("--steps", type=int_at_least(1), help="override the token budget: this many steps per run (timing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run of the suite (repeatable), e.g. wire.link_latency_ms=0")
    p.add_argument("--link", action="append", default=[], metavar="KEY=MBPS[,LATENCY_MS]",
                   help="replace one of the suite's links (see --list), e.g. 80m=4,30 for 4 Mbit/s + 30 ms")
    p.add_argument("--fresh", action="store_true", help="rerun runs that already finished in --out")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    p.add_argument("--list", action="store_true", help="list the suites and their runs, run nothing")
    p.add_argument("--plan", action="store_true",
                   help="print what each run of the suite would do in --out (reuse, resume or run), launch nothing")
    args = p.parse_args(argv)
    if args.list:
        for s in SUITES.values():
            print(f"{s.name}: {s.description}")
            for r in s.runs:
                status, why, _ = check_available(r, s)
                print(f"  {r.name:32s} {r.label} @ {s.links[r.link].label}"
                      + ("" if status == "ok" else f"  [{status}: {why}]"))
        return 0
    if not args.suite or not args.out:
        p.error("--suite and --out are required (or --list)")
    command = "python -m resbm_ds.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.suite == "convergence":
        return convergence.main(args, command)
    if args.suite == "paper-net":
        return network.main(args, command)
    if args.suite == "sites":
        return sites.main(args, command)
    suite = SUITES[args.suite]
    for item in args.link:
        key, _, value = item.partition("=")
        if key not in suite.links or not value:
            p.error(f"--link {item}: expected KEY=MBPS[,LATENCY_MS] with KEY one of {sorted(suite.links)}")
        mbps, _, lat = value.partition(",")
        suite = replace_link(suite, Link(key, "", float(mbps), float(lat) if lat else suite.links[key].latency_ms))
    run_suite(suite, Path(args.out), only=args.only, fresh=args.fresh,
              keep_checkpoints=args.keep_checkpoints, steps=args.steps, command=command,
              settings=tuple(args.set), show_plan=args.plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
