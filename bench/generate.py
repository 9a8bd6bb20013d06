"""Generation throughput: the reference recipe against recray's hf and vllm backends.

Same MovieLens-100k train prompts, SmolLM2-135M-Instruct (fp32) with a LoRA adapter
(r=16 on all projections, random non-zero lora_B), one run of each case. Every case
decodes the same way in all its rows:

  N=1 greedy       1 answer per prompt;
  N=4 8 beams      2N = 8 candidates: 8 beams returning 8;
  N=4 8 samples    2N = 8 candidates: 8 samples at recray's sampling defaults
                   (temperature 1.0, top_p 1.0, no top-k: DecodingConfig and the hf
                   backend's top_k=0);

and runs
  (a)  reference: transformers `generate` in this process, 64 sequences per call,
       max_new_tokens=128, no stop but EOS (the SPRec reference code's recipe; its
       GenerationConfig never sets do_sample, so for 8 samples it is that recipe with
       recray's sampling settings);
  (a') reference, same stop: (a) with recray's max_new_tokens=32 and its stop at the
       end of the title line (`stop_strings`);
  (b)  recray hf backend: GenerationPool(backend=hf), one actor (not for 8 samples);
  (c)  recray vllm backend: GenerationPool(backend=vllm), one actor.

recray decodes with its defaults: max_new_tokens=32 and the stop at the end of the
title line. So the ratio to (a) includes that difference on purpose: it is the
reference recipe as users run it, padding every batch to its longest answer of up to
128 tokens. The ratio to (a') leaves only the engines' own difference. Each recray row
is compared with the (a) and (a') rows of its own case (the table's `vs` column names
them). Engine start-up is timed apart from generation; prompts/s count generation only.
Besides wall time each case reports the CPU seconds its generating process used (this
process for (a), the engine actor's for (b)/(c)): on a machine shared with other jobs,
wall time measures the neighbours too, CPU seconds much less so.

    python bench/generate.py --data PREPARED_DIR [--prompts 256] [--prompts-n4 32]
                             [--cases ref,ref-stop,hf,vllm]

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
from recray.generate.text import STOP

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


def reference_kwargs(d: DecodingConfig, same_stop: bool, tokenizer) -> dict:
    """`generate` arguments of the reference recipe decoding as d does; same_stop: with
    recray's token limit and title-line stop instead of 128 tokens and EOS."""
    if d.mode == "beam":
        kwargs = dict(do_sample=False, num_beams=d.num_beams, num_return_sequences=d.num_return)
    elif d.mode == "sample":
        # top_k=0: transformers would otherwise keep only the 50 likeliest tokens, which
        # recray's backends do not.
        kwargs = dict(do_sample=True, num_return_sequences=d.n, temperature=d.temperature,
                      top_p=d.top_p, top_k=0)
    else:
        kwargs = dict(do_sample=False, num_beams=1)
    if same_stop:
        return {**kwargs, "max_new_tokens": d.max_new_tokens, "stop_strings": [STOP],
                "tokenizer": tokenizer}
    return {**kwargs, "max_new_tokens": REF_NEW_TOKENS}


def reference(prompts: list[str], adapter: str, decoding: DecodingConfig, same_stop: bool) -> dict:
    """(a)/(a'): PeftModel.generate, left-padded batches of REF_SEQUENCES sequences."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(decoding.seed)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), padding_side="left")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32), adapter).eval()
    startup = time.time() - started
    kwargs = reference_kwargs(decoding, same_stop, tokenizer)
    per_prompt = decoding.num_beams if decoding.mode == "beam" else decoding.num_candidates
    per_call = max(1, REF_SEQUENCES // per_prompt)
    started, cpu = time.time(), time.process_time()
    n_tokens = 0
    for i in range(0, len(prompts), per_call):
        batch = tokenizer(prompts[i:i + per_call], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, **kwargs, pad_token_id=tokenizer.eos_token_id)
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


PLANS = [
    ("N=1 greedy", DecodingConfig(mode="greedy"), ("hf", "vllm")),
    ("N=4 8 beams", DecodingConfig(mode="beam", num_beams=8, num_return=8), ("hf", "vllm")),
    ("N=4 8 samples", DecodingConfig(mode="sample", n=8), ("vllm",)),
]


def ratios(run: dict, ref: dict | None, key: str) -> dict:
    """run's speed-up over ref by wall and CPU seconds (None without that reference row)."""
    if ref is None:
        return {f"vs_{key}": None, f"cpu_vs_{key}": None}
    return {f"vs_{key}": ref["generate_s"] / run["generate_s"],
            f"cpu_vs_{key}": ref["cpu_s"] / run["cpu_s"]}


def run_plan(label: str, table: pa.Table, adapter: str, decoding: DecodingConfig,
             backends: tuple[str, ...], cases: list[str]) -> list[dict]:
    """One case's rows: its reference rows first, then recray's, each recray row with
    its ratios to this case's (a) and (a') rows."""
    prompts = table["prompt"].to_pylist()
    runs = {}
    if "ref" in cases:
        runs["(a) reference"] = reference(prompts, adapter, decoding, same_stop=False)
    if "ref-stop" in cases:
        runs["(a') reference, same stop"] = reference(prompts, adapter, decoding, same_stop=True)
    refs = {"ref": runs.get("(a) reference"), "ref_stop": runs.get("(a') reference, same stop")}
    for backend, name in (("hf", "(b) recray hf"), ("vllm", "(c) recray vllm")):
        if backend in backends and backend in cases:
            runs[name] = recray_case(backend, table, adapter, decoding)
    rows = []
    for name, r in runs.items():
        row = {"case": label, "run": name, "prompts": table.num_rows, **r,
               "prompts_per_s": table.num_rows / r["generate_s"], "vs": None}
        if name.startswith(("(b)", "(c)")):
            row["vs"] = f"{label} (a), (a')"
            for key, ref in refs.items():
                row.update(ratios(r, ref, key))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a `recray prepare` output directory")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompts-n4", type=int, default=32)
    parser.add_argument("--cases", default="ref,ref-stop,hf,vllm")
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
        for label, decoding, backends in PLANS:
            count = args.prompts if label.startswith("N=1") else args.prompts_n4
            rows += run_plan(label, train.slice(0, count), adapter, decoding, backends, cases)
    print_table(rows, load_before, os.getloadavg())
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "loadavg_before": load_before,
                                               "loadavg_after": os.getloadavg()}, indent=1))


def print_table(rows: list[dict], before, after) -> None:
    def x(value: float | None) -> str:
        return f"{value:.2f}" if value else "–"

    print(f"\nmachine: {len(os.sched_getaffinity(0))} cores; load average before "
          f"{before[0]:.1f}, after {after[0]:.1f}\n")
    print("| case | run | prompts | start-up s | generate s | prompts/s | CPU s | new tokens "
          "| vs | × (a) | × (a') | × (a) by CPU s | × (a') by CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['run']} | {r['prompts']} | {r['startup_s']:.1f} | "
              f"{r['generate_s']:.1f} | {r['prompts_per_s']:.2f} | {r['cpu_s']:.0f} | "
              f"{r['new_tokens']} | {r['vs'] or '–'} | {x(r.get('vs_ref'))} | "
              f"{x(r.get('vs_ref_stop'))} | {x(r.get('cpu_vs_ref'))} | {x(r.get('cpu_vs_ref_stop'))} |")
    print("\nvs: the reference rows each ratio is against, (a) 128 tokens and EOS, (a') recray's "
          "32 tokens and title-line stop, both decoding as the row's case.")


if __name__ == "__main__":
    main()
