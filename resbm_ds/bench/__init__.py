"""Benchmarks: `python -m resbm_ds.bench` (__main__.py). engine.py is what every suite runs on (validate,
reuse or resume, launch, publish after every run, signals, `--plan`); runner.py runs one training as a
logged subprocess; throughput.py holds the smoke and paper-cpu suites (tokens/s on emulated links, loss
at equal tokens and time); convergence.py what compression costs in loss; network.py (paper-net) and
sites.py the suites on a real shaped network."""
