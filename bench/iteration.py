"""One SPRec iteration at the main job's sizes (configs/ml100k.yaml: 64 samples, negatives,
in-loop SFT, DPO, valid and test evaluation), the old training paths against today's, side
by side in one run, from the same π_0:

    before   train.dpo_shared_prompt=false (a DPO row per answer, the prompt computed 1 + N
             times) and train.merge_adapter=true (a merged model/ written after every LoRA
             step), greedy evaluation
    after    the defaults: the prompt computed once per DPO row, no merged copy, greedy
    beam-4   `before` with its evaluations decoded by 4-beam search (the evaluation of the
             issue's time): the greedy switch as its own row; its negatives/SFT/DPO times
             are `before`'s, its two evaluations are re-run on `before`'s π_1

    python bench/iteration.py                      # trains π_0 first (~7 min here), ~30 min in all
    python bench/iteration.py --from runs/x/sprec  # a finished run of configs/ml100k.yaml

Each case is a real `recray run ... loop.init_from=π_0 loop.iterations=1` in a child
process; stage times come from its manifest, training time and tokens from each step's
log (train_runtime, num_tokens). Model FLOP/s of each training stage as a fraction of the
machine's fp32 matmul peak (bench/train.py's count: LoRA SFT 2F per token, LoRA DPO 3F per
token processed, F the forward FLOPs). The metrics of the two greedy cases are printed to
show they agree within noise (64 valid and 200 test samples: one hit moves HR@5 by 0.016
and 0.005); they are not the same numbers, since the DPO layout changes float rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train import _rate, matmul_peak, model_flops_per_token  # noqa: E402  (bench/train.py)

CONFIG = "configs/ml100k.yaml"
CASES = {
    "before": ["train.dpo_shared_prompt=false", "train.merge_adapter=true"],
    "after": [],
}
BEAM = ["evaluate.decoding.mode=beam", "evaluate.decoding.num_beams=4"]
STAGES = ("negatives", "sft", "policy", "eval/valid", "eval/test")


def recray(*args: str, log: Path) -> None:
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(["recray", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"`recray {' '.join(args)}` failed (rc {done.returncode}); see {log}")
    print(f"  {' '.join(args[:6])} ... {time.time() - start:.0f} s", flush=True)


def train_stats(step: Path) -> dict:
    """Training seconds (first step to last) and tokens processed of one SFT/DPO stage."""
    history = [json.loads(line) for line in (step / "train_log.jsonl").read_text().splitlines()]
    tokens, seconds, _ = _rate(history)
    return {"train_s": seconds, "tokens": tokens,
            "samples": json.loads((step / "summary.json").read_text())["data"]["samples"]}


def flops(kind: str, stats: dict) -> float:
    per_row = stats["tokens"] / stats["samples"]
    forward = sum(model_flops_per_token(per_row))
    return (2 if kind == "sft" else 3) * forward * stats["tokens"] / stats["train_s"]


def metrics(path: Path) -> dict:
    """A run's evaluation stage keeps them in result/, `recray evaluate` at its output."""
    m = json.loads(((path / "result") if (path / "result").exists() else path)
                   .joinpath("metrics.json").read_text())
    return {k: m.get(k) for k in ("HR@5", "DivRatio@1", "ORRatio@1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path,
                        help=f"a finished run of {CONFIG} whose π_0 to start from")
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temp folder)")
    parser.add_argument("--no-beam", action="store_true", help="leave out the beam-4 row")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    work = args.work or Path(tempfile.mkdtemp(prefix="recray-bench-iteration-"))
    work.mkdir(parents=True, exist_ok=True)
    peaks, load = [matmul_peak()], [os.getloadavg()[0]]
    source = args.source
    if source is None:
        print("π_0 (BIGRec) at the main job's sizes", flush=True)
        recray("run", "-c", CONFIG, "--runs", str(work), "--name", "pi0", "loop.method=bigrec",
               log=work / "pi0.log")
        source = work / "pi0"

    rows = {}
    for name, overrides in CASES.items():
        print(f"case {name}", flush=True)
        recray("run", "-c", CONFIG, "--runs", str(work), "--name", name,
               f"loop.init_from={source.resolve()}", "loop.iterations=1", *overrides,
               log=work / f"{name}.log")
        run = work / name
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        rows[name] = {"s": {s: stages[f"it1/{s}"]["seconds"] for s in STAGES},
                      "sft": train_stats(run / "it1/sft"), "dpo": train_stats(run / "it1/policy"),
                      "valid": metrics(run / "it1/eval/valid"), "test": metrics(run / "it1/eval/test")}
        peaks.append(matmul_peak())
        load.append(os.getloadavg()[0])
    if not args.no_beam:
        print("case beam-4 (the evaluations of `before`'s π_1, 4-beam search)", flush=True)
        before = work / "before"
        beam = {**rows["before"], "s": dict(rows["before"]["s"])}
        for split in ("valid", "test"):
            out = work / f"beam4-{split}"
            start = time.time()
            recray("evaluate", "-c", CONFIG, "--data", str(before / "prepared"), "--split", split,
                   "--adapter", str(before / "it1/policy/adapter"), "--output", str(out), *BEAM,
                   log=work / f"beam4-{split}.log")
            beam["s"][f"eval/{split}"] = round(time.time() - start, 1)
            beam[split] = metrics(out)
        rows["beam-4"] = beam
        load.append(os.getloadavg()[0])
    peaks.append(matmul_peak())
    peak = max(peaks)

    print(f"\nOne SPRec iteration, {CONFIG} sizes (64 samples, N = 1, 64 valid + 200 test "
          f"prompts), SmolLM2-135M + LoRA, 2 CPU workers; fp32 matmul peak {peak / 1e9:.0f} "
          f"GFLOP/s (best of {', '.join(f'{p / 1e9:.0f}' for p in peaks)}); 1-min load "
          f"{min(load):.1f}-{max(load):.1f}; runs in {work}")
    ref = sum(rows["before"]["s"].values())
    head = ("| case | negatives s | SFT s (train) | DPO s (train) | DPO tokens | valid eval s | "
            "test eval s | iteration s | before / case | SFT peak | DPO peak | valid HR@5 | "
            "test HR@5 | test DivRatio@1 | test ORRatio@1 |")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for name, r in rows.items():
        s, total = r["s"], sum(r["s"].values())
        print(f"| {name} | {s['negatives']:.0f} | {s['sft']:.0f} ({r['sft']['train_s']:.0f}) | "
              f"{s['policy']:.0f} ({r['dpo']['train_s']:.0f}) | {r['dpo']['tokens']:,.0f} | "
              f"{s['eval/valid']:.0f} | {s['eval/test']:.0f} | {total:.0f} | {ref / total:.2f} | "
              f"{100 * flops('sft', r['sft']) / peak:.0f}% | {100 * flops('dpo', r['dpo']) / peak:.0f}% | "
              f"{r['valid']['HR@5']:.4f} | {r['test']['HR@5']:.4f} | {r['test']['DivRatio@1']:.4f} | "
              f"{r['test']['ORRatio@1']:.4f} |")
    (work / "iteration.json").write_text(json.dumps({"peak": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
