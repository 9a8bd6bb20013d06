"""`recray` command line: thin wrappers over the package's functions."""

from __future__ import annotations

import argparse
import json
import sys
import time
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


def cmd_generate(args) -> None:
    import pyarrow.parquet as pq

    from recray.assets import model_dir
    from recray.config import load_config
    from recray.generate import GenerationPool, Policy
    from recray.generate.negatives import make_negatives
    from recray.generate.pool import write_parquet
    from recray.runtime import init_ray

    overrides = list(args.overrides)
    if args.negatives is not None:
        overrides.append(f"generate.n_negatives={args.negatives}")
    cfg = load_config(args.config, overrides)
    init_ray(cfg.ray)
    data, output = Path(args.data), Path(args.output)
    samples = pq.read_table(data / args.split)
    if args.limit is not None:
        samples = samples.slice(0, args.limit)
    policy = Policy(model=args.model or str(model_dir()), adapter=args.adapter)
    with GenerationPool(cfg.generate, policy.model) as pool:
        if args.negatives is None:
            path = write_parquet(pool.generate(samples, policy), output / "generations.parquet")
            print(json.dumps(pool.last_run, indent=1))
        else:
            result = make_negatives(pool, samples, policy, data / "catalog.parquet", cfg.generate,
                                    output, seed=cfg.generate.decoding.seed)
            path = result.path
            print(json.dumps({k: v for k, v in result.stats.items() if not isinstance(v, dict)},
                             indent=1))
    print(f"wrote {path}")


def cmd_train(args) -> None:
    from recray.assets import model_dir
    from recray.config import load_config
    from recray.errors import ConfigError
    from recray.train import dpo, sft

    cfg = load_config(args.config, args.overrides)
    model = args.model or str(model_dir())
    # sft/dpo check every input, then start Ray (ray.address / RAY_ADDRESS) and the workers.
    if args.step == "sft":
        if args.data is None:
            raise ConfigError("recray train sft needs --data (a prepared directory or Parquet)")
        result = sft(model, args.data, args.output, cfg, phase=args.phase, adapter=args.adapter)
    else:
        if args.negatives is None:
            raise ConfigError("recray train dpo needs --negatives (a negatives Parquet)")
        result = dpo(model, args.negatives, args.output, cfg, adapter=args.adapter)
    print(json.dumps(result.metrics, indent=1))
    print("\n".join(f"{name}: {path}" for name, path in
                    (("model", result.model_dir), ("adapter", result.adapter_dir)) if path))


def cmd_report(args) -> None:
    from recray.evaluate.report import for_terminal, report
    from recray.evaluate.sweep_report import sweep_report
    from recray.sweep import is_sweep_dir
    sweeps = [d for d in args.runs if is_sweep_dir(Path(d))]
    if sweeps:
        if len(args.runs) > 1:
            raise RecrayError(f"{sweeps[0]} is a sweep: report it alone (`recray report SWEEP_DIR`)")
        path = sweep_report(Path(sweeps[0]), Path(args.output or Path(sweeps[0]) / "report"))
    elif args.output is None:
        raise RecrayError("recray report RUN_DIR ... needs --output (only a sweep has a default)")
    else:
        path = report([Path(d) for d in args.runs], Path(args.output), splits=args.split,
                      baseline=args.baseline)
    print(for_terminal(path.read_text()))
    print(f"\nreport: {path}")


def cmd_methods(args) -> None:
    from recray.methods import METHODS
    width = max(map(len, METHODS))
    for name, method in METHODS.items():
        print(f"{name:{width}s}  {method.about}")


def cmd_run(args) -> None:
    from recray.config import load_config
    from recray.job import run_job

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        run_dir = Path(args.resume)
    else:
        name = args.name or time.strftime(f"{cfg.loop.method}-%Y%m%d-%H%M%S")
        run_dir = Path(args.runs) / name
    run_job(cfg, run_dir, resume=bool(args.resume), force=args.force)   # its last line: where


def cmd_sweep(args) -> None:
    from recray.rundir import config_diff
    from recray.sweep import load_sweep, read_sweep, run_sweep

    if args.resume:
        # The sweep as it started (sweep.json); a -c given again must say the same.
        sweep, base = read_sweep(Path(args.resume))
        if args.overrides and not args.config:
            raise RecrayError("--resume continues the sweep as it started: give overrides only "
                              "with the same -c, to check that they match")
        if args.config:
            again = load_sweep(args.config, args.overrides)
            diff = config_diff({"sweep": sweep.model_dump(mode="json"),
                                "base": base.model_dump(mode="json")},
                               {"sweep": again[0].model_dump(mode="json"),
                                "base": again[1].model_dump(mode="json")})
            if diff:
                raise RecrayError(f"the sweep differs from the one {args.resume} was started "
                                  f"with:\n  " + "\n  ".join(diff))
        path = run_sweep(sweep, base, Path(args.resume), resume=True)
    else:
        if not args.config:
            raise RecrayError("recray sweep needs -c SWEEP.yaml (or --resume SWEEP_DIR)")
        sweep, base = load_sweep(args.config, args.overrides)
        output = args.output or time.strftime(f"runs/sweeps/{Path(args.config).stem}-%Y%m%d-%H%M%S")
        path = run_sweep(sweep, base, Path(output), source=args.config)
    print(path.read_text())
    print(f"sweep report: {path}")


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

    p = sub.add_parser("generate", help="candidate answers or DPO negatives for a prepared split")
    p.add_argument("--data", required=True, help="a `recray prepare` output directory")
    p.add_argument("--split", choices=["train", "valid", "test"], default="train")
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder on top of --model")
    p.add_argument("--negatives", type=int, metavar="N",
                   help="write negatives.parquet with N negatives per prompt (else generations.parquet)")
    p.add_argument("--limit", type=int, help="only the first N samples")
    p.add_argument("--output", required=True, help="output directory")
    _config_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="the main job: prepare -> self-play loop -> evaluation -> report")
    p.add_argument("--name", help="run name (default: <method>-<date>-<time>)")
    p.add_argument("--runs", default="runs", help="parent directory of run directories")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last finished stage")
    p.add_argument("--force", action="store_true", help="resume even if the config changed")
    _config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("train", help="one SFT or DPO step on Ray Train (+ DeepSpeed, TRL, PEFT)")
    p.add_argument("step", choices=["sft", "dpo"])
    p.add_argument("--data", help="sft: a `recray prepare` directory or a Parquet file/directory")
    p.add_argument("--negatives", help="dpo: Parquet with sample_id, prompt, chosen, rejected")
    p.add_argument("--output", required=True, help="output directory (adapter/, model/, summary.json)")
    p.add_argument("--model", help="model folder to start from (default: the embedded SmolLM2-135M); "
                                   "for dpo also the frozen reference")
    p.add_argument("--adapter", help="a LoRA adapter on --model to keep training")
    p.add_argument("--phase", choices=["initial", "loop"], default="initial",
                   help="sft: learning rate/epochs from train.sft (initial) or train.sft_loop")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("methods", help="every loop.method, one line each")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("sweep", help="Ray Tune sweep: one self-play loop run per trial")
    p.add_argument("--output", help="sweep directory to create (default: runs/sweeps/<name>-<time>)")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue an interrupted sweep (Tuner.restore)")
    p.add_argument("-c", "--config", help="sweep YAML (see tune/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the base run config, e.g. loop.samples_per_iteration=32")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Markdown + PNG report comparing run directories, or a sweep's")
    p.add_argument("runs", nargs="+", help="run directories (metrics.jsonl), evaluation "
                                           "directories, or one sweep directory")
    p.add_argument("--output", help="report directory (required for runs; a sweep: SWEEP_DIR/report)")
    p.add_argument("--split", choices=["valid", "test"], action="append",
                   help="a split to compare (repeatable); default: every split evaluated, test first")
    p.add_argument("--baseline", default="bigrec",
                   help="method (or evaluation directory name) the differences are measured to")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from recray.runlog import setup_console
    setup_console(args.verbose)
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
