"""Training throughput: SFT and DPO tokens/s of SmolLM2-135M + LoRA (r=16, all projections)
on the same MovieLens-100k samples, four ways, in one run:

    (a) TRL in one plain process (SFTTrainer / DPOTrainer, all cores as torch threads),
        with recray's LM-head compaction (train.compact_lm_head) so it does the same work
    (b) recray on Ray Train, 1 worker (all cores)
    (c) recray on Ray Train, 2 workers (cores split between them)
    (d) recray on Ray Train, 2 workers + DeepSpeed ZeRO-2

plus the machine's measured fp32 matmul peak (a torch matmul loop on all cores; the best of
measurements before each row and at the end, since other processes on a shared machine lower
it) and the model FLOP/s each run achieved, as a fraction of that peak. All four read the same rows,
cut to --max-length by recray's own history truncation.

    python bench/train.py                         # 256 samples (long on 2 cores: ~1 h)
    python bench/train.py --samples 32 --max-length 128     # the run in docs/training.md

tokens/s = tokens processed (prompt + answers, all rows, padding excluded) / train
runtime (from the trainer's first step to its last, without Ray start-up; the "wall"
column has everything). Model FLOPs per token, N = parameters of every matmul of the
model (the tied embedding counted once, as the LM head), forward F = 2N + 4·layers·seq·d
(attention scores):
  LoRA SFT  2F per token (forward + input-gradient backward; frozen weights get no weight
            gradient; the adapter's own FLOPs, < 1 %, are left out)
  LoRA DPO  3F per row token (policy forward + backward, reference forward)
with the LM head counted at the answer positions only (needed_flops): the loss reads
nothing else, so a head that projects the prompts too does no needed work there.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from recray.assets import model_dir  # noqa: E402
from recray.data.prompts import build_completion  # noqa: E402


def matmul_peak(seconds: float = 3.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul loop on all torch threads (fp32 unless `dtype`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - start)


def model_flops_per_token(seq_len: float) -> tuple[float, float]:
    """(forward matmul FLOPs per token, attention FLOPs per token) of the SmolLM2 model."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir())
    head = c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * head * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
    mlp = 3 * c.hidden_size * c.intermediate_size
    n = c.num_hidden_layers * (attn + mlp) + c.vocab_size * c.hidden_size
    return 2.0 * n, 4.0 * c.num_hidden_layers * seq_len * c.hidden_size


def answer_tokens(rows: pd.DataFrame, columns: tuple[str, ...]) -> int:
    """Labelled positions in one pass over a stage's rows: each answer's tokens and EOS as
    TRL splits them from the prompt (recray.train.token_groups.answer_tokens). The loss
    needs the LM head there only."""
    from recray.train.inputs import _tokenizer
    from recray.train.token_groups import answer_tokens as split
    tok = _tokenizer(str(model_dir()))
    return sum(len(split(tok, row["prompt"], answer)[1])
               for _, row in rows.iterrows() for col in columns
               for answer in ([row[col]] if isinstance(row[col], str) else list(row[col])))


def needed_flops(kind: str, tokens: float, seq_len: float, answers: float) -> float:
    """Model FLOPs a LoRA training pass over `tokens` needs: 2F (SFT) or 3F (DPO) per token,
    F every matmul of the model, but the LM head only at the `answers` labelled positions
    (what the loss reads; a head that also projects the prompts does work nobody needs)."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model_dir())
    head = 2.0 * c.vocab_size * c.hidden_size
    forward = sum(model_flops_per_token(seq_len)) * tokens - head * (tokens - answers)
    return (2 if kind == "sft" else 3) * forward


def data(prepared: Path | None, samples: int, work: Path) -> tuple[Path, Path]:
    """`samples` train samples of a prepared MovieLens-100k and one random negative each."""
    if prepared is None:
        from recray.config import DataConfig
        from recray.data.loaders import load
        from recray.data.prepare import prepare
        prepared = work / "prepared"
        prepare(load(DataConfig()), DataConfig(n_train=samples, n_valid=16, n_test=16), prepared)
    train = pd.read_parquet(prepared / "train").head(samples)
    train.to_parquet(work / "sft.parquet")
    titles = pd.read_parquet(prepared / "catalog.parquet")["title"].tolist()
    rng = random.Random(0)
    rejected = [[build_completion(rng.choice([t for t in titles[:200] if t != target]))]
                for target in train["target_title"]]
    pd.DataFrame({"sample_id": train["sample_id"], "prompt": train["prompt"],
                  "chosen": train["completion"], "rejected": rejected,
                  "rejected_scores": [[0.0]] * len(train), "source": "random"}
                 ).to_parquet(work / "neg.parquet")
    return work / "sft.parquet", work / "neg.parquet"


def _rate(history: list[dict]) -> tuple[float, float, float]:
    """(tokens, train seconds, tokens/s) from a trainer log history."""
    tokens = max(h.get("num_tokens", 0) for h in history)
    seconds = next(h["train_runtime"] for h in reversed(history) if "train_runtime" in h)
    return tokens, seconds, tokens / seconds


def plain_trl(kind: str, path: Path, cfg, work: Path) -> dict:
    """(a): TRL's own trainer in this process, same arguments as a recray worker."""
    import datasets
    from trl import DPOTrainer, SFTTrainer

    from recray.train import inputs
    from recray.train.models import compact_lm_head
    from recray.train.worker import Job, load_policy, training_args

    reader = inputs.read_sft if kind == "sft" else inputs.read_negatives
    ds, where = reader(str(path))
    fitted, _ = inputs.fit_to_length(ds, str(model_dir()), cfg.train.max_length, kind, where)
    rows = fitted.to_pandas()
    step = cfg.train.sft if kind == "sft" else cfg.train.dpo
    job = Job(kind=kind, model=str(model_dir()), adapter=None, train=cfg.train.model_dump(mode="json"),
              learning_rate=step.learning_rate, epochs=1, deepspeed=None, precision="fp32",
              run_name="bench", extensions_dir="", output=str(work))
    compact_lm_head(cfg.train.compact_lm_head)      # the same work as recray's workers do
    model, tok, peft = load_policy(job)
    args = training_args(job, str(work / f"plain-{kind}"))
    start = time.time()
    if kind == "sft":
        dataset = datasets.Dataset.from_pandas(rows[["prompt", "completion"]], preserve_index=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             peft_config=peft)
    else:
        dataset = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": list(r)[0]}
                                              for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"])])
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             peft_config=peft)
    trainer.train()
    return {"wall": time.time() - start, "history": trainer.state.log_history}


def recray_run(kind: str, path: Path, cfg, work: Path, name: str) -> dict:
    from recray.train import dpo, sft
    start = time.time()
    out = work / f"{name}-{kind}"
    if kind == "sft":
        result = sft(model_dir(), path, out, cfg)
    else:
        result = dpo(model_dir(), path, out, cfg)
    wall = time.time() - start
    shutil.rmtree(out, ignore_errors=True)
    return {"wall": wall, "history": result.log_history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--prepared", type=Path, help="an existing `recray prepare` folder")
    parser.add_argument("--only", nargs="*", choices=["a", "b", "c", "d"], help="run only these rows")
    args = parser.parse_args()

    from recray.config import load_config
    from recray.runtime import init_ray

    cpus = os.cpu_count() or 2
    base = ["train.sft.epochs=1", "train.dpo.epochs=1", f"train.max_length={args.max_length}",
            "train.per_device_batch_size=4", "train.logging_steps=1", "train.save_steps=100000",
            "train.precision=fp32",           # (a) trains in fp32: every row in the same precision
            f"ray.num_cpus={cpus}"]
    setups = {
        "a": ("(a) TRL, 1 process", None),
        "b": ("(b) recray Ray Train, 1 worker", ["train.scaling.num_workers=1",
                                                  f"train.scaling.cpus_per_worker={cpus}"]),
        "c": ("(c) recray Ray Train, 2 workers", ["train.scaling.num_workers=2",
                                                   f"train.scaling.cpus_per_worker={cpus / 2:g}"]),
        "d": ("(d) recray, 2 workers + ZeRO-2", ["train.scaling.num_workers=2",
                                                  f"train.scaling.cpus_per_worker={cpus / 2:g}",
                                                  "train.deepspeed.stage=2"]),
    }
    peaks = [matmul_peak()]          # the best of several: other load on the machine lowers it
    load = [os.getloadavg()[0]]
    work = Path(tempfile.mkdtemp(prefix="recray-bench-train-"))
    init_ray(load_config(None, base).ray)
    sft_data, neg_data = data(args.prepared, args.samples, work)
    answers = {"sft": answer_tokens(pd.read_parquet(sft_data), ("completion",)),
               "dpo": answer_tokens(pd.read_parquet(neg_data), ("chosen", "rejected"))}

    rows = []
    for key, (label, extra) in setups.items():
        if args.only and key not in args.only:
            continue
        cfg = load_config(None, base + (extra or ["train.scaling.num_workers=1"]))
        peaks.append(matmul_peak())
        row = {"setup": label}
        for kind, path in (("sft", sft_data), ("dpo", neg_data)):
            run = (plain_trl(kind, path, cfg, work) if extra is None
                   else recray_run(kind, path, cfg, work, key))
            tokens, seconds, rate = _rate(run["history"])
            seq = tokens / (args.samples * (1 if kind == "sft" else 2))
            row[kind] = {"tokens/s": rate, "train_s": seconds, "wall_s": run["wall"],
                         "flops": needed_flops(kind, tokens, seq, answers[kind]) / seconds}
            print(f"{label} {kind}: {rate:.0f} tokens/s over {seconds:.0f} s "
                  f"(wall {run['wall']:.0f} s)", flush=True)
        rows.append(row)
        load.append(os.getloadavg()[0])
    peaks.append(matmul_peak())
    peak = max(peaks)
    for r in rows:
        for kind in ("sft", "dpo"):
            r[kind]["mfu"] = r[kind]["flops"] / peak

    print(f"\nSmolLM2-135M + LoRA r=16, {args.samples} MovieLens-100k samples, max_length "
          f"{args.max_length}, batch 4/worker, fp32, {platform.processor() or platform.machine()} "
          f"x {cpus} cores; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (best of "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}); 1-min load average "
          f"{min(load):.1f}-{max(load):.1f} (other processes share these cores)")
    head = (f"{'setup':34s} {'SFT tok/s':>9s} {'SFT s':>6s} {'wall':>6s} {'GFLOP/s':>8s} {'peak%':>6s}"
            f" {'DPO tok/s':>9s} {'DPO s':>6s} {'wall':>6s} {'GFLOP/s':>8s} {'peak%':>6s}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = [f"{r['setup']:34s}"]
        for kind in ("sft", "dpo"):
            m = r[kind]
            cells.append(f"{m['tokens/s']:9.0f} {m['train_s']:6.0f} {m['wall_s']:6.0f} "
                         f"{m['flops'] / 1e9:8.1f} {100 * m['mfu']:5.1f}%")
        print(" ".join(cells))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
