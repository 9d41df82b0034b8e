"""Benchmarks: `python -m resbm_ds.bench` (__main__.py). runner.py runs one training as a logged
subprocess; throughput.py holds the smoke and paper-cpu suites (tokens/s on emulated links, loss at
equal tokens and time); convergence.py what compression costs in loss."""
