"""Argument parsing of ``robustft compare`` (everything else is `lightning_robustft.compare.compare`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from lightning_robustft.compare.api import compare
from lightning_robustft.compare.presets import SOUP, load_presets
from lightning_robustft.errors import RobustFTConfigError

__all__ = ["EXAMPLE", "compare_main", "parser"]

EXAMPLE = (
    "robustft compare --config configs/demo.yaml --methods ft gmixout mixout wiseft "
    "--seeds 0 1 2 --lrs 1e-4 3e-4 1e-3 --out compare_demo"
)


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/N (e.g. 0/4: the first of four shards)") from None


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. trainer.max_epochs=3)")
    return key, yaml.safe_load(value)


def _method_rates(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    try:
        rates = [float(value) for value in values.split(",")]
    except ValueError:
        rates = []
    if not sep or not name or not rates:
        raise argparse.ArgumentTypeError(f"{text!r} is not METHOD=LR[,LR...] (e.g. ft=1e-4,3e-4,1e-3)")
    return name, rates


def parser() -> argparse.ArgumentParser:
    """The ``robustft compare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="robustft compare",
        description="Compare fine-tuning methods on the ID-OOD plane over your own `robustft fit` config: a grid "
        "of fits, each model's WiSE-FT curve, selection on ID validation, frontier gains vs full fine-tuning.",
        epilog=f"example: {EXAMPLE}",
    )
    p.add_argument("--config", help="the base YAML, as `robustft fit --config` takes it (required to run)")
    p.add_argument("--methods", nargs="+", default=["ft"], help="presets, <method>+wiseft, wiseft, greedy_soup")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="learning rates (default: the config's)")
    p.add_argument(
        "--method-lrs",
        nargs="+",
        type=_method_rates,
        default=[],
        metavar="METHOD=LR[,LR]",
        help="a method's own rates instead of --lrs, unscaled (e.g. ft=1e-4,3e-4,1e-3 gmixout_p70=1e-3)",
    )
    p.add_argument("--out", default="robustft_compare", help="output folder (a rerun skips finished cells)")
    p.add_argument("--presets", default=None, help="YAML file of your own presets")
    p.add_argument("--baseline", nargs="+", default=["ft"], help="presets whose WiSE-FT curves form the frontier")
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="WiSE-FT curve coefficients")
    p.add_argument("--wiseft-alpha", type=float, default=0.5, help="alpha of the +wiseft methods")
    p.add_argument("--eval-batches", type=int, default=None, help="at most this many batches per set on the curves")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE")
    p.add_argument("--shard", type=_shard, default=None, metavar="i/N", help="run every N-th cell from the i-th")
    p.add_argument("--summarize", action="store_true", help="no training: merge the shards' cells and summarise")
    p.add_argument("--dry-run", action="store_true", help="check the grid and list its cells; train nothing")
    p.add_argument("--list-presets", action="store_true", help="print the known presets and exit")
    return p


def compare_main(argv: Sequence[str] | None = None) -> None:
    """Run ``robustft compare``; a configuration error exits with status 2 and a one-line message."""
    arguments = parser()
    args = arguments.parse_args(argv)
    if args.config is None and not args.list_presets:
        arguments.error("--config is required: the YAML file `robustft fit --config` takes")
    try:
        if args.list_presets:
            for name, preset in load_presets(args.presets).items():
                print(f"{name:>16}  {preset.description}")
            print(f"{SOUP:>16}  greedy soup of the ft runs of every lr (chosen on ID val)")
            print(f"{'<m>+wiseft':>16}  method <m> interpolated with its start at --wiseft-alpha")
            return
        compare(
            args.config,
            args.methods,
            seeds=args.seeds,
            lrs=args.lrs,
            method_lrs=dict(args.method_lrs),
            out=args.out,
            presets=args.presets,
            baseline=args.baseline,
            alphas=args.alphas,
            wiseft_alpha=args.wiseft_alpha,
            eval_batches=args.eval_batches,
            overrides=dict(args.overrides),
            shard=args.shard,
            summarize_only=args.summarize,
            dry_run=args.dry_run,
            command=shlex.join(["robustft", "compare", *(sys.argv[2:] if argv is None else argv)]),
        )
    except RobustFTConfigError as error:
        print(f"robustft compare: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
