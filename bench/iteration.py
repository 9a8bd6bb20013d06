"""One SPRec iteration at the main job's sizes (configs/ml100k.yaml: 64 samples, negatives,
in-loop SFT, DPO, valid and test evaluation), the old training paths against today's, side
by side in one run:

    before       fp32 (train.precision, generate.dtype), train.dpo_shared_prompt=false (a
                 DPO row per answer, the prompt computed 1 + N times),
                 train.merge_adapter=true (a merged model/ written after every LoRA step)
                 and train.compact_lm_head=false (TRL's CPU LM head: every position
                 projected through the vocabulary, prompts included), greedy evaluation
    after, fp32  fp32, the prompt computed once per DPO row, no merged copy, the LM head on
                 the answer positions only, greedy
    after        the defaults: as `after, fp32` with precision `auto`, which is bf16 on a CPU
                 with bf16 in hardware (AVX512-BF16 or AMX) and fp32 on other CPUs
    beam-4       `before` with its evaluations decoded by 4-beam search (the evaluation of the
                 issue's time): the greedy switch as its own row; its negatives/SFT/DPO times
                 are `before`'s, its two evaluations are re-run on `before`'s π_1

    python bench/iteration.py --no-beam           # ~27 min here: 2 π_0 runs, 3 cases
    python bench/iteration.py --work runs/bench   # a second call reuses the finished runs

π_0 (BIGRec, the main job's initial SFT) is trained once per precision: a run starts only
from a π_0 trained as it trains (loop.init_from refuses another precision), so `before` and
`after, fp32` share the fp32 π_0 and `after` has its own; the π_0 table shows what that
initial step costs each way. Each case is a real `recray run ... loop.init_from=π_0
loop.iterations=1` in a child process; stage times come from its manifest, training time
and tokens from each step's log (train_runtime, num_tokens). Model FLOP/s of each training
stage as a fraction of the machine's matmul peak in the precision it trained in
(bench/train.py's needed_flops: LoRA SFT 2F per token, LoRA DPO 3F per token processed,
F the forward FLOPs with the LM head at the answer positions only, the work the loss
needs: `before`'s projection of every prompt position is waste, not throughput). The metrics are printed to show whether they agree within noise (64 valid
and 200 test samples: one hit moves HR@5 by 0.016 and 0.005); they are not the same
numbers, since the DPO layout and the precision change float rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import _rate, answer_tokens, matmul_peak, needed_flops  # noqa: E402  (bench/train.py)

from recray.config import load_config  # noqa: E402
from recray.train.deepspeed import precision  # noqa: E402

CONFIG = "configs/ml100k.yaml"
FP32 = ["train.precision=fp32", "generate.dtype=float32"]
PI0 = {"fp32": FP32, "auto": []}                 # π_0 runs: name -> precision overrides
CASES = {                                        # case -> (its π_0, its overrides)
    "before": ("fp32", [*FP32, "train.dpo_shared_prompt=false", "train.merge_adapter=true",
                        "train.compact_lm_head=false"]),
    "after, fp32": ("fp32", FP32),
    "after": ("auto", []),
}
BEAM = ["evaluate.decoding.mode=beam", "evaluate.decoding.num_beams=4", *FP32]
STAGES = ("negatives", "sft", "policy", "eval/valid", "eval/test")
SFT, DPO = ("completion",), ("chosen", "rejected")     # each stage's answer columns


def recray(*args: str, log: Path) -> None:
    start = time.time()
    with open(log, "w") as f:
        done = subprocess.run(["recray", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"`recray {' '.join(args)}` failed (rc {done.returncode}); see {log}")
    print(f"  {' '.join(args[:6])} ... {time.time() - start:.0f} s", flush=True)


def train_stats(step: Path, rows: pd.DataFrame, columns: tuple[str, ...]) -> dict:
    """Training seconds (first step to last), tokens processed, answer tokens (all epochs)
    and precision of one stage that trained on `rows`."""
    history = [json.loads(line) for line in (step / "train_log.jsonl").read_text().splitlines()]
    tokens, seconds, _ = _rate(history)
    summary = json.loads((step / "summary.json").read_text())
    epochs = math.ceil(max(entry.get("epoch", 0) for entry in history))
    return {"train_s": seconds, "tokens": tokens, "rows": summary["data"]["samples"] * epochs,
            "answer_tokens": epochs * answer_tokens(rows, columns),
            "precision": summary["precision"]}


def flops(kind: str, stats: dict) -> float:
    """Needed model FLOP/s of one stage (bench/train.py's needed_flops)."""
    return needed_flops(kind, stats["tokens"], stats["tokens"] / stats["rows"],
                        stats["answer_tokens"]) / stats["train_s"]


def metrics(path: Path) -> dict:
    """A run's evaluation stage keeps them in result/, `recray evaluate` at its output."""
    m = json.loads(((path / "result") if (path / "result").exists() else path)
                   .joinpath("metrics.json").read_text())
    return {k: m.get(k) for k in ("HR@5", "DivRatio@1", "ORRatio@1")}


def measure_peaks(peaks: dict) -> None:
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        peaks[name].append(matmul_peak(dtype=dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="where the runs go (default: a temp folder)")
    parser.add_argument("--no-beam", action="store_true", help="leave out the beam-4 row")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    work = args.work or Path(tempfile.mkdtemp(prefix="recray-bench-iteration-"))
    work.mkdir(parents=True, exist_ok=True)
    peaks, load = {"fp32": [], "bf16": []}, [os.getloadavg()[0]]
    measure_peaks(peaks)
    auto = precision(load_config(CONFIG).train)
    print(f"precision auto is {auto} on this machine", flush=True)

    pi0 = {}
    for name, overrides in PI0.items():
        source = work / f"pi0-{name}"
        if not (source / "it0" / "policy" / ".stage.json").exists():
            print(f"π_0 (BIGRec) at the main job's sizes, precision {name}", flush=True)
            recray("run", "-c", CONFIG, "--runs", str(work), "--name", source.name,
                   "loop.method=bigrec", *overrides, log=work / f"{source.name}.log")
        stages = json.loads((source / "manifest.json").read_text())["stages"]
        pi0[name] = {"source": source, "sft": stages["it0/policy"]["seconds"],
                     "train": train_stats(source / "it0/policy",
                                          pd.read_parquet(source / "prepared/train"), SFT),
                     "eval": sum(stages[f"it0/eval/{s}"]["seconds"] for s in ("valid", "test")),
                     "valid": metrics(source / "it0/eval/valid"),
                     "test": metrics(source / "it0/eval/test")}
        measure_peaks(peaks)

    rows = {}
    for name, (start, overrides) in CASES.items():
        folder = name.replace(", ", "-")
        run = work / folder
        if (run / "it1" / "eval" / "test" / ".stage.json").exists():
            print(f"case {name}: reusing the finished {run}", flush=True)
        else:
            print(f"case {name}", flush=True)
            recray("run", "-c", CONFIG, "--runs", str(work), "--name", folder,
                   f"loop.init_from={pi0[start]['source'].resolve()}", "loop.iterations=1",
                   *overrides, log=work / f"{folder}.log")
        stages = json.loads((run / "manifest.json").read_text())["stages"]
        rows[name] = {"s": {s: stages[f"it1/{s}"]["seconds"] for s in STAGES},
                      "sft": train_stats(run / "it1/sft",
                                         pd.read_parquet(run / "it1/samples/samples.parquet"), SFT),
                      "dpo": train_stats(run / "it1/policy",
                                         pd.read_parquet(run / "it1/negatives/negatives.parquet"), DPO),
                      "valid": metrics(run / "it1/eval/valid"), "test": metrics(run / "it1/eval/test")}
        measure_peaks(peaks)
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
    measure_peaks(peaks)
    peak = {name: max(values) for name, values in peaks.items()}

    print(f"\nOne SPRec iteration, {CONFIG} sizes (64 samples, N = 1, 64 valid + 200 test "
          f"prompts), SmolLM2-135M + LoRA, 2 CPU workers; matmul peak fp32 {peak['fp32'] / 1e9:.0f}"
          f" GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} (best of {len(peaks['fp32'])} each); 1-min "
          f"load {min(load):.1f}-{max(load):.1f}; runs in {work}")
    ref = sum(rows["before"]["s"].values())
    head = ("| case | precision | negatives s | SFT s (train) | DPO s (train) | DPO tokens | "
            "valid eval s | test eval s | iteration s | before / case | SFT peak | DPO peak | "
            "valid HR@5 | test HR@5 | test DivRatio@1 | test ORRatio@1 |")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for name, r in rows.items():
        s, total, p = r["s"], sum(r["s"].values()), r["sft"]["precision"]
        print(f"| {name} | {p} | {s['negatives']:.0f} | {s['sft']:.0f} ({r['sft']['train_s']:.0f}) | "
              f"{s['policy']:.0f} ({r['dpo']['train_s']:.0f}) | {r['dpo']['tokens']:,.0f} | "
              f"{s['eval/valid']:.0f} | {s['eval/test']:.0f} | {total:.0f} | {ref / total:.2f} | "
              f"{100 * flops('sft', r['sft']) / peak[p]:.0f}% | "
              f"{100 * flops('dpo', r['dpo']) / peak[p]:.0f}% | {r['valid']['HR@5']:.4f} | "
              f"{r['test']['HR@5']:.4f} | {r['test']['DivRatio@1']:.4f} | "
              f"{r['test']['ORRatio@1']:.4f} |")
    print("\nπ_0 (BIGRec: initial SFT of 128 samples x 2 epochs, then valid + test evaluation)")
    head = ("| π_0 | precision | SFT s (train) | evaluations s | fp32 / this | SFT peak | "
            "valid HR@5 | test HR@5 | test DivRatio@1 | test ORRatio@1 |")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    ref = pi0["fp32"]["sft"] + pi0["fp32"]["eval"]
    for name, r in pi0.items():
        p = r["train"]["precision"]
        print(f"| {name} | {p} | {r['sft']:.0f} ({r['train']['train_s']:.0f}) | {r['eval']:.0f} | "
              f"{ref / (r['sft'] + r['eval']):.2f} | {100 * flops('sft', r['train']) / peak[p]:.0f}% | "
              f"{r['valid']['HR@5']:.4f} | {r['test']['HR@5']:.4f} | "
              f"{r['test']['DivRatio@1']:.4f} | {r['test']['ORRatio@1']:.4f} |")
    (work / "iteration.json").write_text(json.dumps(
        {"peak": peak, "rows": rows, "pi0": {k: {**v, "source": str(v["source"])}
                                             for k, v in pi0.items()}}, indent=1))


if __name__ == "__main__":
    main()
