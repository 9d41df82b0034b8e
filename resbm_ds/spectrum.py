"""Singular-value spectra of the projection matrices in DeepSpeed pipeline checkpoints.

    python -m resbm_ds.spectrum CKPT_DIR [CKPT_DIR ...] [--labels A B ...] [--tag TAG] --out DIR

CKPT_DIR is a checkpoint directory (the tag is read from its `latest` file unless --tag is given)
or a tag directory itself. Each layer file (`layer_XX-model_states.pt`, one per global layer index,
written whatever the number of stages) is read with torch.load: no process group, any layout.

Writes DIR/spectrum.json (every matrix: layer, key, kind, shape, singular values, stable rank,
effective rank) and DIR/spectrum.png: one panel per matrix kind, one curve per run (the mean over
the layers of sigma_i / sigma_max against i / rank, log scale; thin lines are single layers). Muon's
orthogonalised updates push the spectrum flat (sigma_i / sigma_max close to 1 far down the index),
AdamW leaves a few dominant directions: that difference is what the plot shows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoints.loading import layer_files, read_layer
from .checkpoints.store import checkpoint_dir
from .cli import ArgumentParser, cli, existing_dir, output_dir

# A checkpoint file has no module types, only state-dict keys, so here (unlike the optimizer
# routing) the kind of a matrix comes from its key; bottleneck projections are told apart by shape.
KEY_KINDS = {
    "self_attn.q_proj.weight": "attn.q", "self_attn.k_proj.weight": "attn.k",
    "self_attn.v_proj.weight": "attn.v", "self_attn.o_proj.weight": "attn.o",
    "mlp.gate_proj.weight": "ffn.gate", "mlp.up_proj.weight": "ffn.up", "mlp.down_proj.weight": "ffn.down",
}
KINDS = [*KEY_KINDS.values(), "bottleneck.encoder", "bottleneck.decoder"]


def matrix_kind(key: str, shape) -> str | None:
    if key in KEY_KINDS:
        return KEY_KINDS[key]
    if key == "proj.weight" and len(shape) == 2:   # encoder H -> h (wide input), decoder h -> H
        return "bottleneck.encoder" if shape[0] < shape[1] else "bottleneck.decoder"
    return None


def run_label(path: Path) -> str:
    """A curve's default label: the run's name, not `checkpoints` or a tag."""
    p = path.resolve()
    if p.name == "checkpoints":
        return p.parent.name
    if p.parent.name == "checkpoints":
        return f"{p.parent.parent.name}/{p.name}"
    return p.name


def spectrum_stats(w: torch.Tensor) -> dict:
    s = torch.linalg.svdvals(w.double())
    p = s / s.sum()
    return dict(singular_values=s.tolist(),
                stable_rank=float((s ** 2).sum() / s[0] ** 2),                   # ||W||_F^2 / ||W||_2^2
                effective_rank=float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum())))  # Roy & Vetterli


def read_checkpoint(ckpt: Path, tag: str | None = None) -> dict:
    tag_dir = checkpoint_dir(ckpt, tag)
    matrices = []
    for layer, f in layer_files(tag_dir).items():
        state = read_layer(f)
        for key, w in state.items():
            kind = matrix_kind(key, tuple(w.shape))
            if kind is not None:
                matrices.append(dict(layer=layer, key=key, kind=kind, shape=list(w.shape), **spectrum_stats(w)))
    return dict(checkpoint=str(ckpt), tag=tag_dir.name, matrices=matrices)


def plot(runs: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if any(m["kind"] == k for r in runs for m in r["matrices"])]
    cols = min(4, len(kinds))
    rows = -(-len(kinds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes.flat, kinds):
        for i, run in enumerate(runs):
            curves = [torch.tensor(m["singular_values"]) for m in run["matrices"] if m["kind"] == kind]
            if not curves:
                continue
            color = colors[i % len(colors)]
            for s in curves:
                ax.plot(torch.linspace(0, 1, len(s)), s / s[0], color=color, alpha=0.2, lw=0.8)
            n = min(len(s) for s in curves)
            mean = torch.stack([s[:n] / s[0] for s in curves]).mean(0)
            ax.plot(torch.linspace(0, 1, n), mean, color=color, lw=2,
                    label=f"{run['label']} ({len(curves)})")
        ax.set_yscale("log")
        ax.set_title(kind)
        ax.set_xlabel("i / rank")
        ax.set_ylabel("sigma_i / sigma_max")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    fig.suptitle("Singular values of the projection matrices")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli
def main(argv=None):
    p = ArgumentParser(prog="python -m resbm_ds.spectrum", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=existing_dir, help="checkpoint (or tag) directories")
    p.add_argument("--labels", nargs="+", help="one label per checkpoint (default: each run's name)")
    p.add_argument("--tag", help="checkpoint tag (default: each directory's `latest`)")
    p.add_argument("--out", type=output_dir, required=True, help="output directory")
    args = p.parse_args(argv)
    labels = args.labels or [run_label(c) for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        p.error(f"{len(labels)} labels for {len(args.checkpoints)} checkpoints")
    try:
        runs = [dict(label=label, **read_checkpoint(c, args.tag)) for label, c in zip(labels, args.checkpoints)]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in runs:
        if not r["matrices"]:
            print(f"error: {r['checkpoint']}: no projection matrices found", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spectrum.json").write_text(json.dumps(dict(runs=runs)))
    plot(runs, args.out / "spectrum.png")
    for r in runs:
        by_kind = {}
        for m in r["matrices"]:
            by_kind.setdefault(m["kind"], []).append(m["effective_rank"] / min(m["shape"]))
        summary = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in by_kind.items())
        print(f"{r['label']}: {len(r['matrices'])} matrices; effective rank / full rank: {summary}")
    print(f"wrote {args.out / 'spectrum.json'} and {args.out / 'spectrum.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
