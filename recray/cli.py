"""`recray` command line: thin wrappers over the package's functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from recray.errors import RecrayError



def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.min_interactions=5")


def cmd_fetch(args) -> None:
    from recray import assets
    for name, path in assets.fetch_all().items():
        if args.verify:
            bad = assets.verify(name)
            if bad:
                raise RecrayError(f"{name}: files differ from their checksums: {', '.join(bad)}; "
                                  f"delete {path} and fetch again")
        print(f"{name:24s} {path}")


def cmd_prepare(args) -> None:
    from recray.config import load_config
    from recray.data.loaders import load
    from recray.data.prepare import prepare, summary_table
    from recray.runtime import init_ray

    overrides = list(args.overrides)
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.input:
        overrides.append(f"data.input={args.input}")
    cfg = load_config(args.config, overrides)
    init_ray(cfg.ray)
    stats = prepare(load(cfg.data), cfg.data, Path(args.output), overwrite=args.overwrite)
    print(summary_table(stats))
    print(f"\nprepared dataset: {args.output}  (details: {Path(args.output) / 'stats.json'})")


def cmd_evaluate(args) -> None:
    from recray.assets import model_dir
    from recray.config import load_config
    from recray.evaluate.evaluate import evaluate, metrics_table
    from recray.generate import Policy
    from recray.runtime import init_ray

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.ray)
    policy = Policy(model=args.model or str(model_dir()), adapter=args.adapter)
    metrics = evaluate(Path(args.data), args.split, policy, cfg, Path(args.output), args.limit)
    print(metrics_table(metrics))
    print(f"\nwrote {Path(args.output) / 'predictions.parquet'} and {Path(args.output) / 'metrics.json'}")


def cmd_report(args) -> None:
    from recray.evaluate.report import report
    path = report([Path(d) for d in args.runs], Path(args.output), split=args.split)
    print(path.read_text())
    print(f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="fetch the offline model, embedder and MovieLens-100k")
    p.add_argument("--verify", action="store_true", help="re-hash every cached file")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("prepare", help="interaction log -> prompt datasets (Ray Data)")
    p.add_argument("--format", choices=["movielens", "amazon2014", "steam", "goodreads", "table"])
    p.add_argument("--input", help="raw data file or directory (default: embedded MovieLens-100k)")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _config_args(p)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("evaluate", help="generate, ground and score a model on a prepared split")
    p.add_argument("--data", required=True, help="a `recray prepare` output directory")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder on top of --model")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--output", required=True, help="directory for predictions.parquet, metrics.json")
    _config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="Markdown + PNG report comparing run directories")
    p.add_argument("runs", nargs="+", help="run directories (metrics.jsonl) or evaluation directories")
    p.add_argument("--output", required=True)
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.verbose:
        from recray.runtime import hide_ray_data_error_logs
        hide_ray_data_error_logs()
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - a known cause is shown without a traceback
        from recray.runtime import unwrap
        known = unwrap(exc)
        if known is None or args.verbose:
            raise
        print(f"recray {args.command}: error: {known}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
