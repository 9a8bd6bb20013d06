"""Generation throughput: the reference recipe against recray's hf and vllm backends.

Same MovieLens-100k train prompts, SmolLM2-135M-Instruct (fp32) with a LoRA adapter
(r=16 on all projections, random non-zero lora_B), one run of each case:

  (a) reference: transformers `generate` in this process, 64 sequences per call,
      max_new_tokens=128, no stop but EOS (the SPRec reference code's recipe);
  (b) recray hf backend: GenerationPool(backend=hf), one actor;
  (c) recray vllm backend: GenerationPool(backend=vllm), one actor;

for N=1 (greedy, 1 answer) and N=4 (2N = 8 candidates: 8 beams returning 8; vllm also
with 8 samples). recray decodes with its defaults: max_new_tokens=32 and the stop at the
end of the title line. Engine start-up is timed apart from generation; prompts/s count
generation only. Besides wall time each case reports the CPU seconds its generating
process used (this process for (a), the engine actor's for (b)/(c)): on a machine shared
with other jobs, wall time measures the neighbours too, CPU seconds much less so.

    python bench/generate.py --data PREPARED_DIR [--prompts 256] [--prompts-n4 32]

Runs take minutes on 2 cores (N=4 reference: beam search over 128 tokens): the N=4
cases use --prompts-n4 prompts. The machine's load average is printed with the table:
other jobs on a shared machine slow every case.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recray.assets import model_dir
from recray.config import DecodingConfig, GenerateConfig
from recray.generate import GenerationPool, Policy

REF_SEQUENCES = 64      # sequences per reference generate call
REF_NEW_TOKENS = 128


def make_adapter(out: Path) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir()),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def reference(prompts: list[str], adapter: str, beams: int) -> dict:
    """(a): PeftModel.generate, left-padded batches of REF_SEQUENCES sequences."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), padding_side="left")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32), adapter).eval()
    startup = time.time() - started
    per_call = max(1, REF_SEQUENCES // beams)
    started, cpu = time.time(), time.process_time()
    n_tokens = 0
    for i in range(0, len(prompts), per_call):
        batch = tokenizer(prompts[i:i + per_call], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=REF_NEW_TOKENS, do_sample=False,
                                 num_beams=beams, num_return_sequences=beams,
                                 pad_token_id=tokenizer.eos_token_id)
        n_tokens += int((out[:, batch.input_ids.shape[1]:] != tokenizer.eos_token_id).sum())
    return {"startup_s": startup, "generate_s": time.time() - started,
            "cpu_s": time.process_time() - cpu, "new_tokens": n_tokens}


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def recray_case(backend: str, prompts: pa.Table, adapter: str, decoding: DecodingConfig) -> dict:
    cfg = GenerateConfig(backend=backend, actors=1, cpus_per_actor=1,
                         threads_per_actor=len(os.sched_getaffinity(0)), decoding=decoding)
    with GenerationPool(cfg, model_dir()) as pool:
        pid = pool.actor_pids()[0]
        started, cpu = time.time(), cpu_seconds(pid)
        out = pool.generate(prompts, Policy(str(model_dir()), adapter))
        seconds, cpu = time.time() - started, cpu_seconds(pid) - cpu
        startup = pool.startup_s
    tokens = sum(sum(n) for n in out["n_tokens"].to_pylist())
    return {"startup_s": startup, "generate_s": seconds, "cpu_s": cpu, "new_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a `recray prepare` output directory")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompts-n4", type=int, default=32)
    parser.add_argument("--cases", default="ref,hf,vllm")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import ray
    ray.init(address="local", num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False,
             log_to_driver=False)
    train = pq.read_table(Path(args.data) / "train")
    cases = args.cases.split(",")
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(Path(tmp) / "adapter")
        plans = [
            ("N=1", args.prompts, 1, DecodingConfig(mode="greedy")),
            ("N=4", args.prompts_n4, 8, DecodingConfig(mode="beam", num_beams=8, num_return=8)),
        ]
        for label, count, beams, decoding in plans:
            table = train.slice(0, count)
            runs = []
            if "ref" in cases:
                runs.append(("(a) reference", reference(table["prompt"].to_pylist(), adapter, beams)))
            for backend, name in (("hf", "(b) recray hf"), ("vllm", "(c) recray vllm")):
                if backend in cases:
                    runs.append((name, recray_case(backend, table, adapter, decoding)))
            if label == "N=4" and "vllm" in cases:
                runs.append(("(c) recray vllm, 8 samples",
                             recray_case("vllm", table, adapter,
                                         DecodingConfig(mode="sample", n=8, temperature=1.0))))
            ref = None
            for name, r in runs:
                ref = r if name.startswith("(a)") else ref
                rows.append({"case": label, "run": name, "prompts": count, **r,
                             "prompts_per_s": count / r["generate_s"],
                             "vs_reference": ref["generate_s"] / r["generate_s"] if ref else None,
                             "cpu_vs_reference": ref["cpu_s"] / r["cpu_s"] if ref else None})
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows, load_before, os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "loadavg_before": load_before,
                                               "loadavg_after": os.getloadavg()}, indent=1))


def print_table(rows: list[dict], before, after) -> None:
    print(f"\nmachine: {len(os.sched_getaffinity(0))} cores; load average before "
          f"{before[0]:.1f}, after {after[0]:.1f}\n")
    print("| case | run | prompts | start-up s | generate s | prompts/s | × (a) | "
          "CPU s | × (a) by CPU s | new tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_reference']:.2f}" if r["vs_reference"] else "–"
        cpu_ratio = f"{r['cpu_vs_reference']:.2f}" if r["cpu_vs_reference"] else "–"
        print(f"| {r['case']} | {r['run']} | {r['prompts']} | {r['startup_s']:.1f} | "
              f"{r['generate_s']:.1f} | {r['prompts_per_s']:.2f} | {ratio} | {r['cpu_s']:.0f} | "
              f"{cpu_ratio} | {r['new_tokens']} |")


if __name__ == "__main__":
    main()
