"""Where the ranks landed: one line per rank, and a per-node summary that checks the placement.

ResBM only compresses what crosses a *pipeline* boundary. The cheap layout on a cluster is
therefore one pipeline stage per node: data-parallel peers of a stage (adjacent ranks, since
DeepSpeed numbers rank = stage * dp + dp_id) share a node, and only the compressed boundary
tensors travel between nodes. `report_layout` is called once by every rank after the engine is
built; it prints

    [resbm] rank 2 node n2 stage 1 dp 0                  (every rank)
    [resbm] layout: n1: stage 0 (ranks 0-1); n2: stage 1 (ranks 2-3) -> one pipeline stage per node ...
                                                         (rank 0)

and warns when several nodes are used and a node holds more than one stage, or a stage spans
several nodes (its full-size gradient all-reduce then crosses nodes). With
runtime.strict_layout (env RESBM_STRICT_LAYOUT=1) that is an error on every rank instead. The node is Slurm's node name
(SLURMD_NODENAME, also inside torchrun/deepspeed launched by srun), else the host name.
"""
from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist

from .cli import ConfigError


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _ranges(ranks) -> str:
    ranks, out, i = sorted(ranks), [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out)


def layout_problems(placement) -> tuple[str, list[str]]:
    """placement: (rank, node, stage) for every rank -> (summary, problems). Pure; for tests."""
    nodes: dict[str, dict[int, list[int]]] = {}
    stage_nodes: dict[int, list[str]] = {}
    for rank, node, stage in sorted(placement):
        nodes.setdefault(node, {}).setdefault(stage, []).append(rank)
        if node not in stage_nodes.setdefault(stage, []):
            stage_nodes[stage].append(node)
    summary = "; ".join(
        f"{node}: " + ", ".join(f"stage {s} (ranks {_ranges(r)})" for s, r in sorted(stages.items()))
        for node, stages in nodes.items())
    problems: list[str] = []
    if len(nodes) > 1:
        for node, stages in nodes.items():
            if len(stages) > 1:
                problems.append(f"node {node} holds {len(stages)} pipeline stages "
                                f"({', '.join(map(str, sorted(stages)))}), not one stage per node")
        for stage, where in sorted(stage_nodes.items()):
            if len(where) > 1:
                problems.append(f"stage {stage} spans nodes {', '.join(where)}: its data-parallel "
                                f"gradient traffic (full size, uncompressed) crosses nodes")
    return summary, problems


def report_layout(rt, strict: bool) -> None:
    """Every rank: print its placement; rank 0: the per-node summary. `rt`: engine.Runtime."""
    rank = dist.get_rank()
    node = node_name()
    sys.stdout.write(f"[resbm] rank {rank} node {node} stage {rt.stage} dp {rt.dp_rank}\n")
    sys.stdout.flush()
    placement = [None] * dist.get_world_size()
    dist.all_gather_object(placement, (rank, node, rt.stage))
    summary, problems = layout_problems(placement)
    if rank == 0:
        if problems:
            verdict = "WARNING: " + "; ".join(problems)
        elif len({n for _, n, _ in placement}) > 1:
            verdict = "one pipeline stage per node, only compressed boundary tensors cross nodes"
        else:
            verdict = "single node"
        sys.stdout.write(f"[resbm] layout: {summary} -> {verdict}\n")
        sys.stdout.flush()
    if problems and strict:
        raise ConfigError("pipeline.stages", rt.num_stages,
                          "runtime.strict_layout (RESBM_STRICT_LAYOUT=1): " + "; ".join(problems) +
                          " (use --ntasks-per-node = data-parallel size and --nodes = pipeline.stages)")
