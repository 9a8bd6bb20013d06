"""Bad input gets a clear error naming the problem BEFORE any training worker starts (no
workers.jsonl, no Ray Train run folder), and long samples lose history, never the answer."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.cli import main
from recray.config import load_config
from recray.errors import ConfigError, DataError, RecrayError
from recray.train import dpo, sft

from test_train_support import make_negatives, make_prepared, make_tiny_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return make_tiny_model(root / "model"), make_prepared(root / "prepared", n=8)


def _cfg(*overrides):
    return load_config(None, ["ray.num_cpus=2", *overrides])


def _no_worker_started(out):
    assert not (out / "workers.jsonl").exists() and not (out / "checkpoints").exists()


def _expect(exc, match, fn, out):
    with pytest.raises(exc, match=match):
        fn()
    _no_worker_started(out)


def test_bad_model_and_adapter_folders(assets, tmp_path):
    model, prepared = assets
    out = tmp_path / "out"
    _expect(RecrayError, "model folder .*nope does not exist",
            lambda: sft(tmp_path / "nope", prepared, out, _cfg()), out)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\0")
    _expect(RecrayError, "no \\*.safetensors weights \\(found pytorch_model.bin",
            lambda: sft(pickled, prepared, out, _cfg()), out)
    _expect(RecrayError, "adapter folder .*missing does not exist",
            lambda: sft(model, prepared, out, _cfg(), adapter=tmp_path / "missing"), out)


def test_adapter_that_does_not_match_the_model(assets, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    model, prepared = assets
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64))
    torch.manual_seed(0)
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    _expect(RecrayError, "does not match the model: .*lora_[AB].weight has shape .*48.*, but 'model.layers",
            lambda: dpo(model, tmp_path / "neg.parquet", out, _cfg(), adapter=tmp_path / "adapter"), out)


def test_deepspeed_config_contradicting_scaling(assets, tmp_path):
    model, prepared = assets
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 6}))
    out = tmp_path / "out"
    _expect(ConfigError, "train_batch_size=6 contradicts .* scaling.num_workers 2 gives 8",
            lambda: sft(model, prepared, out, _cfg(f"train.deepspeed.config_file={tmp_path}/ds.json")), out)


def test_empty_and_columnless_data(ray_session, assets, tmp_path):
    model, prepared = assets
    out = tmp_path / "out"
    empty = pd.read_parquet(prepared / "train").head(0)
    empty.to_parquet(tmp_path / "empty.parquet")
    _expect(DataError, "empty.parquet: SFT data is empty \\(0 rows\\)",
            lambda: sft(model, tmp_path / "empty.parquet", out, _cfg()), out)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "cols.parquet")
    _expect(DataError, "lacks column\\(s\\) sample_id, prompt, completion \\(has: x\\)",
            lambda: sft(model, tmp_path / "cols.parquet", out, _cfg()), out)
    _expect(DataError, "lacks column\\(s\\) .*rejected",
            lambda: dpo(model, prepared / "train", out, _cfg()), out)
    _expect(DataError, "does not exist", lambda: dpo(model, tmp_path / "none.parquet", out, _cfg()), out)
    _expect(ConfigError, "train.reweight needs the prepared dataset folder",
            lambda: sft(model, tmp_path / "cols.parquet", out, _cfg("train.reweight=true")), out)


def test_bad_negatives(ray_session, assets, tmp_path):
    model, prepared = assets
    out = tmp_path / "out"
    neg = pd.read_parquet(make_negatives(prepared / "train", tmp_path / "neg.parquet"))
    neg.assign(rejected=[[]] + list(neg["rejected"][1:])).to_parquet(tmp_path / "none.parquet")
    _expect(DataError, "1 sample\\(s\\) unusable, e.g. sample u0:001: no rejected answer",
            lambda: dpo(model, tmp_path / "none.parquet", out, _cfg()), out)
    neg.assign(rejected=[[c] for c in neg["chosen"]]).to_parquet(tmp_path / "same.parquet")
    _expect(DataError, "a rejected answer equals the chosen one",
            lambda: dpo(model, tmp_path / "same.parquet", out, _cfg()), out)


def test_long_samples_lose_oldest_history_never_the_answer(ray_session, assets, tmp_path):
    from transformers import AutoTokenizer

    from recray.data.prompts import build_prompt
    from recray.train import inputs

    model, prepared = assets
    tok = AutoTokenizer.from_pretrained(model)
    df = pd.read_parquet(prepared / "train")
    full = max(len(tok(p + c)["input_ids"]) + 1 for p, c in zip(df["prompt"], df["completion"]))
    one_title = max(len(tok(build_prompt(t[-1:]) + c)["input_ids"]) + 1
                    for t, c in zip(df["history_titles"], df["completion"]))
    ds, where = inputs.read_sft(prepared)
    fitted, stats = inputs.fit_to_length(ds, str(model), full - 1, "sft", where)
    rows = fitted.to_pandas().set_index("sample_id").loc[df["sample_id"]]
    assert stats["samples"] == 8 and stats["truncated"] >= 1
    assert stats["titles_dropped"] == int(rows["titles_dropped"].sum()) >= stats["truncated"]
    assert list(rows["completion"]) == list(df["completion"])             # answers untouched
    for (_, r), titles in zip(rows.iterrows(), df["history_titles"]):
        assert r["prompt"] == build_prompt(list(titles)[r["titles_dropped"]:])   # oldest first
        assert len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 <= full - 1

    out = tmp_path / "out"
    _expect(DataError, f"do not fit train.max_length={one_title - 1} tokens even with one history title",
            lambda: sft(model, prepared, out, _cfg(f"train.max_length={one_title - 1}")), out)


def test_cli_reports_bad_input_without_traceback(assets, tmp_path, capsys):
    model, prepared = assets
    code = main(["train", "sft", "--data", str(prepared), "--output", str(tmp_path / "out"),
                 "--model", str(tmp_path / "missing")])
    assert code == 2
    assert "recray train: error: model folder" in capsys.readouterr().err
    code = main(["train", "dpo", "--output", str(tmp_path / "out"), "--model", str(model)])
    assert code == 2 and "needs --negatives" in capsys.readouterr().err


def test_rw_weight_column_from_the_prepared_dataset(ray_session, assets):
    from recray.train import inputs
    from recray.train.reweight import sample_weights

    model, prepared = assets
    ds, where = inputs.read_sft(prepared, reweight=True)
    ds, _ = inputs.fit_to_length(ds, str(model), 512, "sft", where)
    weighted, stats = inputs.add_rw_weights(ds, prepared)
    got = weighted.to_pandas().set_index("sample_id")["weight"]
    df = pd.read_parquet(prepared / "train")
    catalog = pd.read_parquet(prepared / "catalog.parquet")
    expected = sample_weights([list(h) for h in df["history_item_ids"]], list(df["target_item_id"]),
                              dict(zip(catalog["item_id"], map(list, catalog["categories"]))),
                              json.loads((prepared / "groups.json").read_text())["groups"])
    assert list(got.loc[df["sample_id"]]) == pytest.approx(list(expected))
    assert got.mean() == pytest.approx(1.0) and got.std() > 0.01      # the synthetic groups are skewed
    assert set(stats["group_weights"]) <= {"Drama", "Comedy", "Action"}
