"""Data parallelism across sites: a DiLoCo-family outer loop over complete ResBM pipelines.

A site is one complete pipeline, launched as its own DeepSpeed world (its own launcher and master
port, ZeRO inside when it has several replicas). `SiteSync` adds, per site-local rank, one gloo
process group between the same (stage, data-parallel rank) of every site, built from its own
TCPStore (sync.master_addr / master_port, hosted by site 0's first rank) as torchft does: the
sites' DeepSpeed worlds are untouched, and nothing crosses between sites during inner steps.

Every `sync.inner_steps` optimizer steps each rank takes its share of its stage's trainable
parameters (the flattened parameters cut into dp equal shards, so a site's replicas use their links
in parallel) and, against theta_start (the shard at the last outer step):
  diloco      all-reduces the pseudo-gradient delta = theta_start - theta (fp32) and averages it;
  sparseloco  adds delta into its error feedback e (e <- error_decay * e + delta), sends the top
              `topk` of every `chunk` values of e quantised to `bits` bits, subtracts what it sent
              from e, and averages the sites' decoded messages;
then takes the outer SGD step theta = theta_start - outer_lr * (Nesterov) momentum(delta_avg), and
the site's replicas all-gather their new shards (inside the site). Every site applies the same
bits in the same order, so parameters are equal across sites after every outer step.

Bytes between sites are counted per rank as the algorithms move them (`bytes_per_sync`): a ring
all-reduce of n bytes sends 2(k-1)/k n from each of k sites; an all-gather of a p-byte message
sends (k-1) p; the start-up check 40 bytes (5 float64) to each other site. A site's total is the sum over
its ranks (trainer.py's `wire_bytes_sites`).
"""
from __future__ import annotations

import math
import re
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import Config

HANDSHAKE = ("start step", "pipeline.stages", "data-parallel size", "parameters in this shard",
             "checksum of the starting weights")


class SiteError(Exception):
    """The outer loop cannot go on (a site left, sites that do not match): one line, the run ends.
    Not a RuntimeError, so the trainer does not read it as a failure of its own site's peers."""


def sparse_payload_bytes(n: int, chunk: int, topk: int, bits: int) -> int:
    """Bytes of one sparseloco message for n values: per chunk two fp32 scales and topk uint16
    indices; the topk * chunks values packed at `bits` bits each (the last byte padded)."""
    chunks = -(-n // chunk)
    return chunks * 8 + chunks * topk * 2 + -(-chunks * topk * bits // 8)


def encode_sparse(v: torch.Tensor, chunk: int, topk: int, bits: int) -> torch.Tensor:
    """The top-`topk` values by magnitude of every `chunk` values of v (zero-padded), as one uint8
    message of `sparse_payload_bytes` bytes: each value a sign bit and `bits`-1 bits of magnitude on
    a uniform grid between the chunk's smallest and largest kept magnitude (2 bits: sign and low or
    high), so a 2-bit code keeps the sign and the rough size that error feedback then corrects."""
    n = v.numel()
    chunks = -(-n // chunk)
    rows = F.pad(v.float(), (0, chunks * chunk - n)).view(chunks, chunk)
    idx = rows.abs().topk(topk, dim=1).indices
    vals = rows.gather(1, idx)
    mag = vals.abs()
    lo, hi = mag.amin(1, keepdim=True), mag.amax(1, keepdim=True)
    levels = 2 ** (bits - 1) - 1
    j = ((mag - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny) * levels).round().clamp(0, levels)
    q = (j.to(torch.uint8) | ((vals < 0).to(torch.uint8) << (bits - 1))).reshape(-1)
    per = 8 // bits
    q = F.pad(q, (0, -q.numel() % per)).view(-1, per)
    packed = torch.zeros(q.shape[0], dtype=torch.uint8)
    for k in range(per):
        packed |= q[:, k] << (bits * k)
    scales = torch.cat([lo, hi], 1).reshape(-1).view(torch.uint8)
    indices = (idx - 32768).to(torch.int16).reshape(-1).view(torch.uint8)
    return torch.cat([scales, indices, packed])


def decode_sparse(msg: torch.Tensor, n: int, chunk: int, topk: int, bits: int) -> torch.Tensor:
    """The dense fp32 vector of n values that `encode_sparse` described (zeros off the top-k)."""
    chunks = -(-n // chunk)
    count = chunks * topk
    lo, hi = msg[:chunks * 8].clone().view(torch.float32).view(chunks, 2).split(1, dim=1)
    idx = msg[chunks * 8:chunks * 8 + count * 2].clone().view(torch.int16).to(torch.int64).add(32768)
    packed = msg[chunks * 8 + count * 2:]
    per, mask, levels = 8 // bits, 2 ** bits - 1, 2 ** (bits - 1) - 1
    q = torch.stack([(packed >> (bits * k)) & mask for k in range(per)], 1).reshape(-1)[:count].view(chunks, topk)
    mag = lo + (q & levels).float() * ((hi - lo) / levels)
    vals = torch.where((q >> (bits - 1)).bool(), -mag, mag)
    return torch.zeros(chunks, chunk).scatter_(1, idx.view(chunks, topk), vals).reshape(-1)[:n]


def describe_sites(cfg: Config) -> str:
    """The outer loop, for the trainer's plan line ('' for one site)."""
    s = cfg.sync
    if s.method == "allreduce":
        return ""
    lr, momentum = s.outer()
    sparse = f", top-{s.topk} of {s.chunk} at {s.bits} bits" if s.method == "sparseloco" else ""
    return (f"; {s.method} across {s.sites} sites (this is site {s.site_rank}), outer step every {s.inner_steps} "
            f"steps, outer lr {lr:g}, momentum {momentum:g}{sparse}")


class SiteSync:
    """The outer loop of one rank: its shard's theta_start, outer momentum and error feedback, the
    process group to the same rank of every other site, and the bytes it sent to them."""

    @classmethod
    def create(cls, cfg: Config, module: torch.nn.Module, stage: int, stages: int, dp_rank: int, dp_size: int,
               dp_group) -> "SiteSync | None":
        """None for sync.method=allreduce (one site; ZeRO does all the data parallelism)."""
        return None if cfg.sync.method == "allreduce" else cls(cfg, module, stage, stages, dp_rank, dp_size, dp_group)

    def __init__(self, cfg, module, stage, stages, dp_rank, dp_size, dp_group):
        s = cfg.sync
        self.cfg, self.method, self.sites, self.site = s, s.method, s.sites, s.site_rank
        self.lr, self.momentum_coef = s.outer()
        self.stage, self.stages, self.dp_rank, self.dp_size, self.dp_group = stage, stages, dp_rank, dp_size, dp_group
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.shard_len = -(-self.numel // dp_size)
        self.start = self._shard(self._flat())     # theta_start: this rank's shard, fp32
        self.momentum = torch.zeros_like(self.start) if self.momentum_coef else None
        self.error = torch.zeros_like(self.start) if self.method == "sparseloco" else None
        self.start_step: int | None = None          # set by the handshake at the first step
        self.sent = 0                                # bytes to other sites since the last take_bytes()
        self.syncs = 0
        self.timeout = timedelta(seconds=s.timeout_s or cfg.runtime.dist_timeout_s)
        self.group = self._join() if self.sites > 1 else None

    # ---- the process group between sites ----------------------------------------------------
    def _join(self):
        """Rendezvous with the same (stage, dp rank) of every site through site 0's TCPStore."""
        s, local = self.cfg, self.stage * self.dp_size + self.dp_rank
        try:
            store = dist.TCPStore(s.master_addr, s.master_port, is_master=self.site == 0 and local == 0,
                                  timeout=self.timeout, wait_for_workers=False)
            prefix = f"resbm_sync/S{self.stages}/dp{self.dp_size}/s{self.stage}/d{self.dp_rank}"
            return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), self.site, self.sites, self.timeout)
        except (RuntimeError, OSError) as e:
            raise SiteError(f"site {self.site}: the sites' rendezvous at {s.master_addr}:{s.master_port} failed "
                            f"within {self.timeout.total_seconds():g} s ({_first_line(e)}); start every site with "
                            "the same sync.master_addr / master_port, pipeline.stages and data-parallel size") from None

    def _collective(self, what: str, step: int, fn):
        try:
            return fn()
        except (RuntimeError, OSError) as e:
            raise SiteError(f"site {self.site} of {self.sites}: another site left the outer sync or stopped answering "
                            f"({what} at step {step}: {_first_line(e)}); this site stops, its last checkpoint is "
                            "intact; restart every site with --resume") from None

    def _all_gather(self, t: torch.Tensor, what: str, step: int) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.sites)]
        self._collective(what, step, lambda: self.group.allgather([out], [t]).wait())
        self.sent += (self.sites - 1) * t.numel() * t.element_size()
        return out

    def _all_reduce(self, t: torch.Tensor, what: str, step: int):
        self._collective(what, step, lambda: self.group.allreduce([t]).wait())
        self.sent += 2 * (self.sites - 1) * t.numel() * t.element_size() // self.sites

    # ---- parameters <-> this rank's shard ----------------------------------------------------
    def _flat(self) -> torch.Tensor:
        """The parameters as one fp32 vector on the CPU, where the outer state lives (off the GPU's
        memory, and where gloo runs every collective)."""
        return torch.cat([p.detach().float().reshape(-1).cpu() for p in self.params])

    def _shard(self, flat: torch.Tensor) -> torch.Tensor:
        flat = F.pad(flat, (0, self.shard_len * self.dp_size - flat.numel()))
        return flat[self.dp_rank * self.shard_len:(self.dp_rank + 1) * self.shard_len].clone()

    def _write(self, shard: torch.Tensor):
        """Put the new shard into every replica of the site (all-gather inside the site), into the
        model's parameters and, where DeepSpeed keeps fp32 master weights (ZeRO-1, bf16), into those."""
        if self.dp_size > 1:   # on the site's own backend and device (nccl on GPUs)
            mine = shard.to(self.params[0].device)
            parts = [torch.empty_like(mine) for _ in range(self.dp_size)]
            dist.all_gather(parts, mine, group=self.dp_group)
            flat = torch.cat(parts)
        else:
            flat = shard
        offset = 0
        for p in self.params:
            value = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            with torch.no_grad():
                p.copy_(value)
            if hasattr(p, "_hp_mapping"):
                from deepspeed.utils import safe_set_full_fp32_param
                safe_set_full_fp32_param(p, value)

    # ---- the loop ----------------------------------------------------------------------------
    def after_step(self, step: int, loss: float):
        """Called after every optimizer step; every `inner_steps` steps, the outer step. A step with a
        non-finite loss is left to the trainer's own check, so a diverged site never sends."""
        if not math.isfinite(loss):
            return
        if self.start_step is None:
            self._handshake(step - 1)
        if step % self.cfg.inner_steps == 0:
            self._outer_step(step)

    def _handshake(self, start_step: int):
        """Sites must start at the same step, with the same layout and weights: checked once."""
        self.start_step = start_step
        if self.group is None:
            return
        mine = torch.tensor([start_step, self.stages, self.dp_size, self.shard_len,
                             float(self.start.double().sum())], dtype=torch.float64)
        theirs = self._all_gather(mine, "the start-up check", start_step + 1)
        for site, other in enumerate(theirs):
            for name, a, b in zip(HANDSHAKE, mine.tolist(), other.tolist()):
                if a != b:
                    raise SiteError(f"site {self.site}: site {site} differs in its {name} ({b:g}, here {a:g}); "
                                    "start every site from the same config and checkpoint step")

    def _outer_step(self, step: int):
        delta = self.start - self._shard(self._flat())
        if self.method == "diloco":
            if self.group is not None:
                self._all_reduce(delta, "the pseudo-gradient all-reduce", step)
                delta /= self.sites
        else:
            s = self.cfg
            self.error.mul_(s.error_decay).add_(delta)
            msg = encode_sparse(self.error, s.chunk, s.topk, s.bits)
            self.error -= decode_sparse(msg, self.shard_len, s.chunk, s.topk, s.bits)
            msgs = [msg] if self.group is None else self._all_gather(msg, "the sparse pseudo-gradient exchange", step)
            delta = decode_sparse(msgs[0], self.shard_len, s.chunk, s.topk, s.bits)
            for other in msgs[1:]:   # the same order on every site: the same bits everywhere
                delta += decode_sparse(other, self.shard_len, s.chunk, s.topk, s.bits)
            delta /= self.sites
        if self.momentum is not None:
            self.momentum.mul_(self.momentum_coef).add_(delta)
            delta = delta + self.momentum_coef * self.momentum if self.cfg.nesterov else self.momentum.clone()
        self.start -= self.lr * delta
        self._write(self.start)
        self.syncs += 1

    def take_bytes(self) -> int:
        """Bytes this rank sent to other sites since the last call."""
        sent, self.sent = self.sent, 0
        return sent

    def bytes_per_sync(self) -> int:
        """What one outer step sends from this rank (the formula tests/test_sync.py checks)."""
        k = self.sites
        if k == 1:
            return 0
        if self.method == "diloco":
            return 2 * (k - 1) * self.shard_len * 4 // k
        s = self.cfg
        return (k - 1) * sparse_payload_bytes(self.shard_len, s.chunk, s.topk, s.bits)

    # ---- checkpoints -------------------------------------------------------------------------
    def file(self, tag_dir: Path) -> Path:
        return Path(tag_dir) / f"outer_state_stage{self.stage:02d}_dp{self.dp_rank:03d}.pt"

    def save(self, tag_dir: Path):
        """The outer state beside DeepSpeed's files, so the tag's manifest covers it."""
        Path(tag_dir).mkdir(parents=True, exist_ok=True)
        torch.save(dict(method=self.method, sites=self.sites, shard_len=self.shard_len, start=self.start,
                        momentum=self.momentum, error=self.error), self.file(tag_dir))

    def load(self, tag_dir: Path):
        path = self.file(tag_dir)
        if not path.exists():
            raise SiteError(f"checkpoint {tag_dir} has no outer state ({path.name}): it was not written by a "
                            f"sync.method={self.method} run")
        state = torch.load(path, weights_only=True)
        if (state["method"], state["sites"], state["shard_len"]) != (self.method, self.sites, self.shard_len):
            raise SiteError(f"{path} holds the outer state of sync.method={state['method']} with "
                            f"{state['sites']} sites and {state['shard_len']} values per shard; this run has "
                            f"{self.method}, {self.sites}, {self.shard_len}")
        self.start, self.momentum, self.error = state["start"], state["momentum"], state["error"]


def _first_line(e: BaseException) -> str:
    """The gist of a gloo / store error: its first line without gloo's source location and advice."""
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return line.split(" This is typically caused", 1)[0][:200]
