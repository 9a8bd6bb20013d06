"""GDRT's token groups (seed 002; seed-methods.md §2.3 (a)-(b)): how predictable each
answer token is without the user.

    a_t = log p_φ(y_t | x^∅, y_<t)     x^∅: the same prompt with its history list emptied
    group(t) = how many of the global (1/G, ..., (G-1)/G) quantiles of a_t lie below a_t

so group 0 holds the tokens that depend most on the user's history and group G-1 those a
model predicts from the instruction and the answer's own prefix alone (quotes, "The",
year fragments, EOS). φ, the scorer, is BIGRec's π_0 ([CHOICE]: the bias is "induced by
SFT", so a post-SFT model; computed once). The tokens are exactly those TRL's SFT trains
on (prompt + completion + EOS tokenised together, the answer from where the tokenised
prompt and prompt + completion diverge); a sample whose answer tokenises differently
after x^∅ than after its own prompt is a DataError, since its groups would not align.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recray.config import Config
from recray.data.prompts import build_prompt
from recray.errors import DataError


def answer_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(context, answer): the tokens TRL's SFT sees for (prompt, completion), split where
    the tokenised prompt and prompt + completion diverge; it trains on the answer."""
    from trl.data_utils import _tokenize, common_prefix_length
    eos = tokenizer.eos_token
    answer = completion if completion.endswith(eos) else completion + eos
    prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
    full = _tokenize(tokenizer, prompt + answer)["input_ids"]
    start = common_prefix_length(prompt_ids, full)
    return full[:start], full[start:]


def auxiliary_logps(model, rows: list[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 16) -> list[list[float]]:
    """log p(y_t | context, y_<t) of every answer token of each (context, answer) row."""
    import torch
    out = []
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo:lo + batch_size]
            width = max(len(c) + len(a) for c, a in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (context, answer) in enumerate(chunk):
                row = context + answer
                ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for b, (context, answer) in enumerate(chunk):
                at = torch.arange(len(context) - 1, len(context) - 1 + len(answer))
                out.append(logps[b, at, torch.tensor(answer)].tolist())
    return out


def assign_groups(aux: list[list[float]], n_groups: int) -> tuple[list[list[int]], list[float]]:
    """Each token's group by the global quantiles of a_t; and the cut points."""
    flat = np.concatenate([np.asarray(a, float) for a in aux])
    cuts = np.quantile(flat, [k / n_groups for k in range(1, n_groups)])
    return [np.searchsorted(cuts, a, side="left").tolist() for a in aux], cuts.tolist()


def score_token_groups(train: pa.Table, base: str, scorer: str, noun: str, n_groups: int,
                       trust_remote_code: bool = False) -> tuple[pa.Table, dict]:
    """`train` with `aux_logp` and `token_groups` per answer token, and their statistics."""
    from collections import Counter

    from peft import PeftModel
    from transformers import AutoTokenizer

    from recray.train.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    if (Path(scorer) / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(load_model(base, "float32", trust_remote_code), scorer)
    else:
        model = load_model(scorer, "float32", trust_remote_code)
    model.eval()
    empty = build_prompt([], noun)
    rows, answers = [], []
    for sid, prompt, completion in zip(*(train.column(c).to_pylist()
                                          for c in ("sample_id", "prompt", "completion"))):
        _, own = answer_tokens(tokenizer, prompt, completion)
        context, alone = answer_tokens(tokenizer, empty, completion)
        if own != alone:
            raise DataError(f"sample {sid}: its answer tokenises differently after the prompt "
                            f"without history, so GDRT's token groups would not align",
                            field="completion")
        rows.append((context, alone))
        answers.append(own)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    aux = auxiliary_logps(model, rows, pad)
    groups, cuts = assign_groups(aux, n_groups)
    flat_groups = np.concatenate([np.asarray(g) for g in groups])
    flat_aux = np.concatenate([np.asarray(a) for a in aux])
    flat_tokens = np.concatenate([np.asarray(a) for a in answers])
    stats = {"scorer": scorer, "samples": train.num_rows, "tokens": int(len(flat_aux)),
             "cuts": cuts, "groups": []}
    for g in range(n_groups):
        inside = flat_groups == g
        common = Counter(flat_tokens[inside].tolist()).most_common(5)
        stats["groups"].append({"group": g, "tokens": int(inside.sum()),
                                "mean_aux_logp": float(flat_aux[inside].mean()) if inside.any() else None,
                                "most_common": [[tokenizer.decode([t]), n] for t, n in common]})
    table = (train.append_column("aux_logp", pa.array(aux, pa.list_(pa.float32())))
             .append_column("token_groups", pa.array(groups, pa.list_(pa.int8()))))
    return table, stats


def gdrt_sft_data(run, cfg: Config, base: str, prepared: Path) -> Path:
    """GDRT's stages before π_0: the scorer (BIGRec's π_0, trained here unless
    train.gdrt.scorer names one) and the train split with its token groups. Returns the
    Parquet file π_0's SFT reads."""
    import ray

    from recray import train
    scorer = cfg.train.gdrt.scorer
    if scorer is None:
        if not run.done("gdrt/scorer"):
            with run.stage("gdrt/scorer") as out:
                run.outcome(train.sft(base, prepared, out, cfg, phase="initial").line())
        trained = run.path("gdrt/scorer")
        scorer = str(trained / ("adapter" if (trained / "adapter").exists() else "model"))
    if not run.done("gdrt/groups"):
        s = cfg.train.scaling
        task = ray.remote(score_token_groups).options(
            num_cpus=s.cpus_per_worker * (1 if s.use_gpu else s.num_workers),
            num_gpus=1 if s.use_gpu else 0)
        with run.stage("gdrt/groups") as out:
            table, stats = ray.get(task.remote(pq.read_table(prepared / "train"), base, scorer,
                                               cfg.data.noun, cfg.train.gdrt.groups,
                                               cfg.train.trust_remote_code))
            pq.write_table(table, out / "train.parquet")
            (out / "groups_stats.json").write_text(json.dumps(stats, indent=1))
    return run.path("gdrt/groups") / "train.parquet"
