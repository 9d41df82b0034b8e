"""`python -m resbm_ds.hf config DIR [--config BASE] [key=value ...]`: print a run config (YAML) for
`python -m resbm_ds.train --config`, with the model section and `model.init_from_hf` filled in."""
from __future__ import annotations

import sys

import yaml

from ..cli import ArgumentParser, cli
from ..config import load_config
from .configs import config_from_hf
from .weights import check_hf_weights


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m resbm_ds.hf", description="Hugging Face transformers interop")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="print a run config (YAML) built from a transformers directory")
    c.add_argument("hf_dir")
    c.add_argument("--config", default=None, help="base run config (file or preset); default: defaults")
    c.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    args = ap.parse_args(argv)
    cfg = config_from_hf(args.hf_dir, base=load_config(args.config, args.overrides)).validate()
    check_hf_weights(cfg.model, cfg.model.init_from_hf)   # the config is only useful with its weights
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
