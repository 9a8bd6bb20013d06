"""Helpers shared by the tests/test_train_*.py files (no tests here): a tiny Llama with the
real SmolLM2 tokenizer, a small prepared-style dataset and a negatives file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from recray.data.prompts import build_completion, build_prompt

TITLES = [f"Movie {chr(65 + i)} ({1990 + i})" for i in range(20)]
GENRES = ["Drama", "Comedy", "Action"]


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer of 400 tokens trained on this file's prompts (any text
    encodes). With SmolLM2's 49k vocabulary the LM head would be most of a tiny model's work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [build_prompt(TITLES[i:i + 3]) + build_completion(TITLES[i]) for i in range(len(TITLES))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")


def make_tiny_model(out: Path, seed: int = 0, smollm2_tokenizer: bool = False) -> Path:
    """A 2-layer Llama (hidden 32) saved as safetensors with a tiny tokenizer (or the real
    SmolLM2 one)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from recray.assets import model_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir()) if smollm2_tokenizer else make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_prepared(out: Path, n: int = 32, history: int = 3) -> Path:
    """A prepared-dataset folder (train/*.parquet, catalog.parquet, groups.json) of n samples."""
    rows = []
    for i in range(n):
        hist = [f"i{(i + k) % len(TITLES)}" for k in range(history)]
        target = f"i{(i * 7 + 3) % len(TITLES)}"
        titles = [TITLES[int(h[1:])] for h in hist]
        rows.append({"sample_id": f"u{i // 4}:{i % 4 + 1:03d}", "user_id": f"u{i // 4}",
                     "history_item_ids": hist, "history_titles": titles,
                     "target_item_id": target, "target_title": TITLES[int(target[1:])],
                     "target_time": 1000 + i, "prompt": build_prompt(titles),
                     "completion": build_completion(TITLES[int(target[1:])])})
    (out / "train").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(out / "train" / "part-00000.parquet")
    catalog = pd.DataFrame({"item_id": [f"i{k}" for k in range(len(TITLES))], "title": TITLES,
                            "categories": [[GENRES[k % 3]] + (["Drama"] if k % 5 == 0 else [])
                                           for k in range(len(TITLES))],
                            "train_count": [1] * len(TITLES)})
    catalog.to_parquet(out / "catalog.parquet")
    (out / "groups.json").write_text(json.dumps({"groups": GENRES}))
    return out


def make_negatives(prepared_train: Path | pd.DataFrame, out: Path, n_negatives: int = 1,
                   titles: list[str] | None = None) -> Path:
    """A negatives Parquet as the generation step writes it: other titles as rejected answers."""
    df = prepared_train if isinstance(prepared_train, pd.DataFrame) else pd.read_parquet(prepared_train)
    titles = titles or TITLES
    rejected, scores = [], []
    for i, target in enumerate(df["target_title"]):
        others = [t for t in titles if t != target]
        rejected.append([build_completion(others[(i * 3 + j) % len(others)]) for j in range(n_negatives)])
        scores.append([-1.0 - j for j in range(n_negatives)])
    pd.DataFrame({"sample_id": df["sample_id"], "prompt": df["prompt"], "chosen": df["completion"],
                  "rejected": rejected, "rejected_scores": scores,
                  "source": "self-play"}).to_parquet(out)
    return out


def make_job(kind: str, model: Path, out: Path, adapter: Path | None = None, lr: float = 1e-3,
             **train):
    """The Job a Ray Train worker would get, for building the same trainer in-process."""
    from recray.config import TrainConfig
    from recray.train.worker import Job

    cfg = TrainConfig(**{"logging_steps": 1, "save_steps": 1000, "per_device_batch_size": 4,
                         **train}).model_dump(mode="json")
    return Job(kind=kind, model=str(model), adapter=str(adapter) if adapter else None, train=cfg,
               learning_rate=lr, epochs=1, deepspeed=None, precision="fp32", run_name="inproc",
               extensions_dir=str(out / "ext"), output=str(out))
