"""A run's metrics: metrics.jsonl (written by the trainer on rank 0, one row per logged step and one
per evaluation; read by the trainer's summary and the benchmarks), plain log lines, and the
experiment trackers (TensorBoard, W&B, MLflow), every one on the training-step axis."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import urllib.parse
from pathlib import Path

from .cli import ConfigError
from .config import REPO_ROOT, Config
from .system import unreachable

METRICS_FILE = "metrics.jsonl"
TRACKER_IDS = "trackers.json"      # the W&B / MLflow run ids, so a resumed run continues the same run


def metric_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each readable row of a metrics.jsonl. A line that is not a JSON object (the
    half-written last line a kill during an append leaves) is dropped, with a note saying which."""
    rows, torn = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = "torn"
        if isinstance(row, dict):
            rows.append((line, row))
        elif row is not None:
            torn.append(n)
    if torn:
        last = " (the last one: a write cut short)" if torn == [len(lines)] else ""
        print(f"[resbm] note: {path}: dropped {len(torn)} unreadable line(s) {torn}{last}", file=sys.stderr, flush=True)
    return rows


def read_metrics(run_dir) -> tuple[list[dict], list[dict]]:
    """(training rows, which have `loss`; evaluation rows, which have `val_loss`) of a run."""
    rows = [r for _, r in metric_rows(Path(run_dir) / METRICS_FILE)]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def package_version() -> str:
    """resbm-ds's installed version; "source" when run from a checkout that is not installed."""
    try:
        return importlib.metadata.version("resbm-ds")
    except importlib.metadata.PackageNotFoundError:
        return "source"


def run_metadata() -> dict:
    """What a tracker should know besides the config: the code's commit and the package versions."""
    import deepspeed
    import torch
    import transformers

    sha = None
    if (REPO_ROOT / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"git_sha": sha, "resbm_ds": package_version(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "host": platform.node()}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


TRACKER_DEADLINE_S = 10   # to reach a tracking server: at launch, and for each request during the run


def check_trackers_reachable(cfg: Config) -> None:
    """A tracking server named by URL (tracking.mlflow_uri=http[s]://...) must accept a connection
    within TRACKER_DEADLINE_S, checked before launch: unreachable, MLflow's client would wait for
    minutes at the first step, printing nothing."""
    k = cfg.tracking
    url = urllib.parse.urlparse(k.mlflow_uri or "") if k.mlflow else None
    if url is None or url.scheme not in ("http", "https"):
        return
    why = unreachable(k.mlflow_uri, TRACKER_DEADLINE_S)
    if why:
        raise ConfigError("tracking.mlflow_uri", k.mlflow_uri,
                          f"{why}; start the tracking server, or leave tracking.mlflow_uri unset for a "
                          "SQLite store in the run directory")


class Trackers:
    """The configured trackers (rank 0 only). `log(row)` sends a metrics row at `row["step"]`."""

    def __init__(self, cfg: Config, out: Path, resumed: bool):
        k, self.out = cfg.tracking, out
        ids_file = out / TRACKER_IDS
        ids = {}
        if resumed and ids_file.exists():
            try:
                ids = json.loads(ids_file.read_text())
            except ValueError:
                print(f"[resbm] note: {ids_file} is damaged: the trackers start new runs", file=sys.stderr, flush=True)
        config, meta = cfg.to_dict(), run_metadata()
        name = k.run_name or out.resolve().name
        self.tb = self.wandb = self.mlflow = None
        if k.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
            if not resumed:
                self.tb.add_text("config", "```\n" + json.dumps({**config, "meta": meta}, indent=1) + "\n```")
        if k.wandb:
            import wandb
            self.wandb = wandb.init(project=k.wandb_project, name=name, dir=os.environ.get("WANDB_DIR", str(out)),
                                    mode=k.wandb_mode, id=ids.get("wandb"), resume="allow",
                                    config={**config, "meta": meta})
            ids["wandb"] = self.wandb.id
        if k.mlflow:
            # MLflow's client retries a server that stops answering for minutes (urllib3 backoff),
            # silently and deaf to SIGTERM; bound it (the environment may still say otherwise)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(TRACKER_DEADLINE_S))
            import mlflow
            self.mlflow = mlflow.tracking.MlflowClient(k.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
            run_id = ids.get("mlflow")
            if run_id is None:
                exp = self.mlflow.get_experiment_by_name(k.experiment)
                exp_id = exp.experiment_id if exp else self.mlflow.create_experiment(k.experiment)
                run_id = self.mlflow.create_run(exp_id, run_name=name,
                                               tags={k: str(v) for k, v in meta.items() if v is not None}).info.run_id
                params = flatten(config)
                for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
                    batch = list(params.items())[i:i + 100]
                    self.mlflow.log_batch(run_id, params=[mlflow.entities.Param(a, str(b)[:6000]) for a, b in batch])
            self.mlflow_run = run_id
            ids["mlflow"] = run_id
        if ids:
            ids_file.write_text(json.dumps(ids))

    def log(self, row: dict):
        step = row["step"]
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"resbm/{k}", v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.mlflow:
            import mlflow
            ts = int(row.get("time", 0) * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[mlflow.entities.Metric(k, v, ts, step)
                                                            for k, v in scalars.items()])

    def close(self, ok: bool = True):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish(exit_code=0 if ok else 1)
        if self.mlflow:
            self.mlflow.set_terminated(self.mlflow_run, status="FINISHED" if ok else "FAILED")


class Metrics:
    """metrics.jsonl, the plain log line and the trackers, for one run (rank 0 writes; others no-op)."""

    def __init__(self, cfg: Config, out: Path, resumed_step: int, enabled: bool, plain_lines: bool):
        self.path, self.enabled, self.plain = out / METRICS_FILE, enabled, plain_lines
        self.steps = cfg.train.steps
        self.trackers = None
        if not enabled:
            return
        if self.path.exists():   # drop rows past the checkpoint we resumed from
            rows = [line for line, r in metric_rows(self.path) if r.get("step", 0) <= resumed_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self.trackers = Trackers(cfg, out, resumed=resumed_step > 0)

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers.log(row)
        if self.plain:
            print(plain_line(row, self.steps), flush=True)

    def close(self, ok: bool = True):
        if self.trackers:
            self.trackers.close(ok)


def plain_line(row: dict, total: int) -> str:
    """One line per logged step or evaluation, for logs that are files (Slurm, nohup, CI)."""
    step = f"[resbm] step {row['step']}/{total}"
    if "val_loss" in row:
        return f"{step} val_loss {row['val_loss']:.4f} (eval {row.get('eval_s', 0):.1f}s)"
    if "checkpoint" in row:
        return f"{step} checkpoint {row['checkpoint']} saved ({row['checkpoint_s']:.1f}s)"
    parts = [f"loss {row['loss']:.4f}", f"lr {row['lr']:.3g}", f"grad_norm {_g(row.get('grad_norm'))}",
             f"tok/s {row['tokens_per_s']:,.0f}", f"wire {(row['wire_bytes_fwd'] + row['wire_bytes_bwd']) / 1e6:.3f} MB",
             f"peak mem {row.get('peak_mem_mb', 0):,.0f} MB"]
    return f"{step} " + ", ".join(parts)


class NetCounters:
    """The kernel's byte and packet counters of one network interface, read from
    /sys/class/net/IF/statistics (under `ip netns exec` that is the namespace's own sysfs). The
    trainer records their change over each timed step as net_tx_bytes, net_rx_bytes,
    net_tx_packets, net_rx_packets: an account of what crossed the link that does not depend on
    our own meter (it includes TCP/IP headers, gloo's framing and retransmissions)."""

    FIELDS = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")

    def __init__(self, iface: str):
        self.iface, self.dir = iface, Path("/sys/class/net") / iface / "statistics"

    def read(self) -> dict[str, int]:
        return {f: int((self.dir / f).read_text()) for f in self.FIELDS}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        return {f"net_{f}": after[f] - before[f] for f in NetCounters.FIELDS}


# Dense bf16 peak FLOP/s per device, for MFU; CPUs and unknown devices get none (no MFU reported).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops() -> float | None:
    import torch
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def is_terminal() -> bool:
    return sys.stderr.isatty()
