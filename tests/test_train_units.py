"""Training mechanics without Ray: the S-DPO loss, RW weights, the trainers' losses against
TRL's own, max_length handling and DeepSpeed config checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recray.config import TrainConfig
from recray.errors import ConfigError
from recray.train.deepspeed import deepspeed_config, precision
from recray.train.inputs import drop_oldest_title
from recray.train.losses import dmpo_loss, sdpo_loss, weighted_token_loss
from recray.train.reweight import group_weights, sample_weights

from test_train_support import make_job, make_prepared, make_tiny_model


# ---------------------------------------------------------------- S-DPO loss

def test_sdpo_loss_matches_hand_computed_value():
    # h_w = 0.5; h_l = 1.0, -2.0, 0.3; beta 0.1:
    #   S = e^{0.05} + e^{-0.25} + e^{-0.02} = 2.8102705527541842
    #   loss = -log sigmoid(-log S) = log(1 + S) = 1.3377001978390028
    loss = sdpo_loss(torch.tensor([0.5], dtype=torch.float64),
                     torch.tensor([[1.0, -2.0, 0.3]], dtype=torch.float64),
                     torch.tensor([[True, True, True]]), beta=0.1)
    assert loss.item() == pytest.approx(1.3377001978390028, abs=1e-12)


def test_sdpo_with_one_negative_is_exactly_dpo():
    # hand value: -log sigmoid(0.1 * (0.5 - -1.0)) = log(1 + e^{-0.15}) = 0.6209570477895321
    one = sdpo_loss(torch.tensor([0.5], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64),
                    torch.tensor([[True]]), beta=0.1)
    assert one.item() == pytest.approx(0.6209570477895321, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(64, generator=g) * 5, torch.randn(64, 1, generator=g) * 5
    for beta in (0.1, 0.5, 2.0):
        ours = sdpo_loss(chosen, rejected, torch.ones(64, 1, dtype=torch.bool), beta)
        dpo = -F.logsigmoid(beta * (chosen - rejected[:, 0]))
        assert torch.equal(ours, dpo) or torch.allclose(ours, dpo, rtol=0, atol=1e-6)


def test_sdpo_masked_negatives_are_left_out():
    full = sdpo_loss(torch.tensor([0.5]), torch.tensor([[1.0, 99.0]]),
                     torch.tensor([[True, False]]), beta=0.1)
    one = sdpo_loss(torch.tensor([0.5]), torch.tensor([[1.0]]), torch.tensor([[True]]), beta=0.1)
    assert full.item() == pytest.approx(one.item(), abs=1e-7)
    with pytest.raises(ValueError):
        sdpo_loss(torch.tensor([0.5]), torch.tensor([[1.0]]), torch.tensor([[False]]), beta=0.1)


def test_dmpo_loss_matches_hand_computed_value_and_is_dpo_for_one_negative():
    # h_w = 0.5; h_l = 1.0, -2.0, 0.3 (mean -0.2333...); beta 0.1:
    #   loss = -log sigmoid(0.1 * (0.5 + 0.7/3)) = log(1 + e^{-0.07333...}) = 0.6571525855...
    loss = dmpo_loss(torch.tensor([0.5], dtype=torch.float64),
                     torch.tensor([[1.0, -2.0, 0.3, 99.0]], dtype=torch.float64),
                     torch.tensor([[True, True, True, False]]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * (0.5 + 0.7 / 3))), abs=1e-12)
    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.randn(32, generator=g), torch.randn(32, 1, generator=g)
    one = torch.ones(32, 1, dtype=torch.bool)
    assert torch.allclose(dmpo_loss(chosen, rejected, one, 0.5), sdpo_loss(chosen, rejected, one, 0.5))


def test_rosepo_loss_hand_values_and_zero_smoothing_is_dpo():
    from recray.train.losses import personal_smoothing, rosepo_loss
    chosen, rejected = torch.tensor([0.4, -0.2]), torch.tensor([[0.1, 9.0], [0.3, -0.5]])
    mask = torch.tensor([[True, False], [True, True]])
    eps = personal_smoothing(torch.tensor([-3.0, -2.0]), torch.tensor([[-4.0, 0.0], [-1.0, -3.0]]),
                             mask, eps_max=0.2, temperature=2.0)
    # prompt 0: ref margin -3 - (-4) = 1 -> 0.2 σ(-0.5); prompt 1: -2 - (-2) = 0 -> 0.1
    assert eps.tolist() == pytest.approx([0.2 / (1 + math.exp(0.5)), 0.1])
    loss = rosepo_loss(chosen, rejected, mask, 0.5, eps)

    def pair(delta: float, e: float) -> float:
        return (1 - e) * math.log1p(math.exp(-0.5 * delta)) + e * math.log1p(math.exp(0.5 * delta))
    assert loss.tolist() == pytest.approx([pair(0.3, eps[0].item()),
                                           (pair(-0.5, 0.1) + pair(0.3, 0.1)) / 2])
    no_smoothing = rosepo_loss(chosen, rejected[:, :1], mask[:, :1], 0.5, torch.zeros(2))
    assert no_smoothing.tolist() == pytest.approx(
        sdpo_loss(chosen, rejected[:, :1], mask[:, :1], 0.5).tolist())


def test_sdpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([[0.0, 0.0]], requires_grad=True)
    sdpo_loss(chosen, rejected, torch.ones(1, 2, dtype=torch.bool), 0.1).sum().backward()
    assert chosen.grad.item() < 0 and (rejected.grad > 0).all()


# ---------------------------------------------------------------- RW

def test_rw_weights_hand_computed():
    groups = ["A", "B"]
    item_groups = {"x": ["A"], "y": ["B"], "z": ["A", "B"], "w": ["Other"]}
    histories = [["x", "x", "y"], ["z"], ["y"], ["w"]]
    targets = ["x", "x", "z", "w"]
    # history shares: A = 1+1+0.5 = 2.5, B = 1+0.5+1 = 2.5 -> 0.5 / 0.5 ("w": no top group)
    # target shares:  A = 1+1+0.5 = 2.5, B = 0.5          -> 5/6 / 1/6
    assert group_weights(histories, targets, item_groups, groups) == pytest.approx({"A": 0.6, "B": 3.0})
    # x -> 0.6, x -> 0.6, z -> mean(0.6, 3.0) = 1.8, w -> 1; mean is already 1
    assert sample_weights(histories, targets, item_groups, groups) == pytest.approx([0.6, 0.6, 1.8, 1.0])


def test_rw_weights_are_clipped_and_mean_one():
    item_groups = {"a": ["A"], "b": ["B"]}
    histories = [["a"] * 99 + ["b"]] * 3
    targets = ["b", "b", "a"]        # B is 2/3 of targets but 1% of history -> tiny weight
    w = sample_weights(histories, targets, item_groups, ["A", "B"], clip=10.0)
    assert w.mean() == pytest.approx(1.0)
    # w_A = 0.99 / (1/3) = 2.97; w_B = 0.01 / (2/3) = 0.015, clipped to 1/10
    assert w[2] / w[0] == pytest.approx(2.97 / 0.1)


def test_weighted_token_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])   # 0 = not trained on
    # (2 * 3.0 + 0.5 * 0.5) / 3 tokens
    assert weighted_token_loss(logps, torch.tensor([2.0, 0.5]), 3).item() == pytest.approx(6.25 / 3)


# ---------------------------------------------------------------- the trainers vs TRL's own

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(root / "model"), make_prepared(root / "prepared", n=8)


def _randomize_lora(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name and ".default." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_sdpo_trainer_with_one_negative_equals_trl_dpo_trainer(tiny, tmp_path, shared_prompt):
    import datasets
    from trl import DPOTrainer

    from recray.train.worker import load_policy, make_trainer, training_args
    from test_train_support import make_negatives
    import pandas as pd

    model_dir, prepared = tiny
    neg = pd.read_parquet(make_negatives(prepared / "train", tmp_path / "neg.parquet"))
    rows = [{"prompt": p, "chosen": c, "rejected": list(r)}
            for p, c, r in zip(neg["prompt"], neg["chosen"], neg["rejected"])][:4]
    job = make_job("dpo", model_dir, tmp_path, dpo_shared_prompt=shared_prompt)
    ours = make_trainer(job, datasets.Dataset.from_list(rows), str(tmp_path / "ours"))
    model, tok, peft = load_policy(job)
    theirs = DPOTrainer(model=model, args=training_args(job, str(tmp_path / "trl")), processing_class=tok,
                        peft_config=peft, train_dataset=datasets.Dataset.from_list(
                            [{**r, "rejected": r["rejected"][0]} for r in rows]))
    for trainer in (ours, theirs):
        _randomize_lora(trainer.model, seed=1)       # policy != reference, so the loss is not log 2
    batch_ours = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    batch_trl = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        a = ours.compute_loss(ours.model, batch_ours)
        b = theirs.compute_loss(theirs.model, batch_trl)
    assert abs(a.item() - math.log(2)) > 1e-3
    assert a.item() == pytest.approx(b.item(), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert ours._metrics["train"][key][-1] == pytest.approx(theirs._metrics["train"][key][-1], abs=1e-6)


@pytest.mark.parametrize("loss_name,shared_prompt", [("softmax", True), ("mean_reward", True),
                                                     ("rosepo", True), ("softmax", False)])
def test_dpo_trainer_with_several_negatives_matches_a_hand_computation(tiny, tmp_path, loss_name,
                                                                       shared_prompt):
    """The trainer's loss for N = 3 (one prompt with 2), recomputed by hand: each answer's
    log-probability under the policy and the reference (adapter off) from plain
    one-sequence forwards, then S-DPO's mean_b log(1 + Σ_j exp(β (h_lj − h_w))) or DMPO's
    mean_b log(1 + exp(−β (h_w − mean_j h_lj))), or RosePO's mean_j of
    −[(1−ε) log σ(βΔ_j) + ε log σ(−βΔ_j)] with ε = 0.3·σ(−(ref_w − mean_j ref_lj)/0.5).
    Both layouts (the prompt shared by all answers of a row, or one row per answer) must
    give it."""
    import datasets
    import pandas as pd

    from recray.train.worker import make_trainer
    from test_train_support import make_negatives

    model_dir, prepared = tiny
    neg = pd.read_parquet(make_negatives(prepared / "train", tmp_path / "neg.parquet", n_negatives=3))
    rows = [{"prompt": p, "chosen": c, "rejected": list(r)}
            for p, c, r in zip(neg["prompt"], neg["chosen"], neg["rejected"])][:4]
    rows[2]["rejected"] = rows[2]["rejected"][:2]
    job = make_job("dpo", model_dir, tmp_path, beta=0.5, multi_negative_loss=loss_name,
                   dpo_shared_prompt=shared_prompt, rosepo={"eps_max": 0.3, "temperature": 0.5})
    trainer = make_trainer(job, datasets.Dataset.from_list(rows), str(tmp_path / "ours"))
    _randomize_lora(trainer.model, seed=3)
    model, tok = trainer.model.eval(), trainer.processing_class
    with torch.no_grad():
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        loss = trainer.compute_loss(model, batch).item()

        def answer_logp(prompt: str, answer: str) -> float:
            ending = "" if answer.endswith(tok.eos_token) else tok.eos_token
            full = tok(prompt + answer + ending)["input_ids"]
            ask = tok(prompt)["input_ids"]
            start = next(i for i, (a, b) in enumerate(zip(ask + [None], full)) if a != b)
            logps = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1], dim=-1)
            return sum(logps[t - 1, full[t]].item() for t in range(start, len(full)))

        def h(prompt: str, answer: str) -> tuple[float, float]:
            policy = answer_logp(prompt, answer)
            with model.disable_adapter():
                reference = answer_logp(prompt, answer)
            return policy - reference, reference

        def logsigmoid(x: float) -> float:
            return -math.log1p(math.exp(-x))

        by_hand = []
        for r in rows:
            chosen, ref_chosen = h(r["prompt"], r["chosen"])
            rejected, ref_rejected = zip(*[h(r["prompt"], a) for a in r["rejected"]])
            if loss_name == "rosepo":
                eps = 0.3 / (1 + math.exp((ref_chosen - sum(ref_rejected) / len(ref_rejected)) / 0.5))
                pairs = [-((1 - eps) * logsigmoid(0.5 * (chosen - x)) + eps * logsigmoid(-0.5 * (chosen - x)))
                         for x in rejected]
                by_hand.append(sum(pairs) / len(pairs))
            elif loss_name == "softmax":
                by_hand.append(math.log1p(sum(math.exp(0.5 * (x - chosen)) for x in rejected)))
            else:
                by_hand.append(math.log1p(math.exp(-0.5 * (chosen - sum(rejected) / len(rejected)))))
    assert abs(loss - math.log(4)) > 1e-3              # not the value at policy = reference
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_dpo_pair_weights_scale_each_prompts_loss(tiny, tmp_path, shared_prompt):
    """UFO-like's pair weights: the loss is mean_b c_b ℓ_b, so weights of 1 change nothing
    and a weight of 0 removes a prompt (both layouts carry the weight through)."""
    import datasets
    import pandas as pd

    from recray.train.worker import make_trainer
    from test_train_support import make_negatives

    model_dir, prepared = tiny
    neg = pd.read_parquet(make_negatives(prepared / "train", tmp_path / "neg.parquet"))
    rows = [{"prompt": p, "chosen": c, "rejected": list(r)}
            for p, c, r in zip(neg["prompt"], neg["chosen"], neg["rejected"])][:2]
    job = make_job("dpo", model_dir, tmp_path, dpo_shared_prompt=shared_prompt)

    def loss(data: list[dict]) -> float:
        trainer = make_trainer(job, datasets.Dataset.from_list(data), str(tmp_path / "t"))
        _randomize_lora(trainer.model, seed=2)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    plain = loss(rows)
    assert loss([{**r, "weight": 1.0} for r in rows]) == pytest.approx(plain, abs=1e-6)
    first_alone = loss(rows[:1])
    assert loss([{**rows[0], "weight": 2.0}, {**rows[1], "weight": 0.0}]) == pytest.approx(
        first_alone, abs=1e-6)
    assert abs(first_alone - plain) > 1e-4


def test_weighted_sft_loss_is_trl_loss_with_unit_weights(tiny, tmp_path):
    import datasets
    import pandas as pd

    from recray.train.worker import make_trainer

    model_dir, prepared = tiny
    df = pd.read_parquet(prepared / "train").head(4)
    plain = [{"prompt": p, "completion": c} for p, c in zip(df["prompt"], df["completion"])]
    job = make_job("sft", model_dir, tmp_path)
    trl = make_trainer(job, datasets.Dataset.from_list(plain), str(tmp_path / "a"))
    assert "weight" not in trl.train_dataset.column_names

    def loss(trainer) -> float:
        _randomize_lora(trainer.model, seed=2)
        trainer.model.eval()                         # no LoRA dropout: both see the same weights
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    def weighted(ws):
        return loss(make_trainer(job, datasets.Dataset.from_list(
            [{**r, "weight": w} for r, w in zip(plain, ws)]), str(tmp_path / "b")))

    reference = loss(trl)
    assert weighted([1.0, 1.0, 1.0, 1.0]) == pytest.approx(reference, rel=1e-6)   # float sum order
    first, rest = weighted([2.0, 0.0, 0.0, 0.0]), weighted([0.0, 2.0, 2.0, 2.0])
    assert first + rest == pytest.approx(2 * reference, rel=1e-6)     # the loss is linear in the weights
    assert first != pytest.approx(rest, abs=1e-3)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_compact_lm_head_scores_only_labelled_positions_with_the_same_loss_and_gradients(
        tiny, tmp_path, monkeypatch, kind):
    import datasets
    import pandas as pd
    import trl.trainer.utils as trl_utils

    from recray.train.worker import make_trainer
    from test_train_support import make_negatives

    model_dir, prepared = tiny
    if kind == "sft":
        df = pd.read_parquet(prepared / "train").head(4)
        rows = [{"prompt": p, "completion": c} for p, c in zip(df["prompt"], df["completion"])]
    else:
        neg = pd.read_parquet(make_negatives(prepared / "train", tmp_path / "neg.parquet"))
        rows = [{"prompt": p, "chosen": c, "rejected": list(r)}
                for p, c, r in zip(neg["prompt"], neg["chosen"], neg["rejected"])][:4]
    scored = []                                  # rows of hidden states the LM head projects
    head = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden, *args):
            scored.append(hidden.shape[0])
            return head.apply(hidden, *args)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)

    def step(compact: bool):
        job = make_job(kind, model_dir, tmp_path, compact_lm_head=compact)
        trainer = make_trainer(job, datasets.Dataset.from_list(rows), str(tmp_path / str(compact)))
        _randomize_lora(trainer.model, seed=3)
        trainer.model.eval()                     # no LoRA dropout: both see the same weights
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        labelled = int((batch["labels"][:, 1:] != -100).sum()) if kind == "sft" else None
        scored.clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.item(), grads, list(scored), batch, labelled

    loss_all, grads_all, rows_all, batch, _ = step(compact=False)
    loss_few, grads_few, rows_few, _, labelled = step(compact=True)
    assert len(rows_few) == len(rows_all)               # the same calls (DPO: policy, reference)
    assert all(few < every / 3 for few, every in zip(rows_few, rows_all))   # prompts: no labels
    if kind == "sft":                                   # TRL on a CPU: every shifted position
        assert rows_all == [batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)]
        assert rows_few == [labelled]
    assert loss_few == pytest.approx(loss_all, rel=1e-6)
    assert grads_few.keys() == grads_all.keys() and grads_all
    for name, g in grads_all.items():
        torch.testing.assert_close(grads_few[name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- max_length, DeepSpeed

def test_drop_oldest_title_keeps_the_template():
    from recray.data.prompts import build_prompt
    assert drop_oldest_title(build_prompt(["A (1990)", "B, The (1991)", "C (1992)"])) == \
        build_prompt(["B, The (1991)", "C (1992)"])
    assert drop_oldest_title(build_prompt(["Only (2000)"])) is None
    assert drop_oldest_title("no history list here") is None


def _train(**kw) -> TrainConfig:
    return TrainConfig.model_validate(kw)


def test_deepspeed_config_from_config():
    assert deepspeed_config(_train()) is None
    ds = deepspeed_config(_train(deepspeed={"stage": 3, "offload_optimizer": True}))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["train_batch_size"] == "auto" and ds["bf16"]["enabled"] == "auto"


@pytest.mark.parametrize("user, train, message", [
    ({"train_batch_size": 64}, {}, "train_batch_size=64 contradicts"),
    ({"train_micro_batch_size_per_gpu": 2}, {}, "train_micro_batch_size_per_gpu=2 contradicts"),
    ({"gradient_accumulation_steps": 4}, {}, "gradient_accumulation_steps=4"),
    ({"bf16": {"enabled": True}}, {}, "bf16.enabled=True contradicts train.precision"),
    ({"fp16": {"enabled": True}}, {}, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 3}}, {"stage": 2}, "sets zero_optimization.stage 3"),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, {},
     "needs ZeRO stage 1, 2 or 3"),
])
def test_deepspeed_file_contradicting_the_scaling_config(tmp_path, user, train, message):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = _train(deepspeed={"config_file": str(path), **train}, per_device_batch_size=4,
                 scaling={"num_workers": 2}, precision="fp32")    # auto may be bf16 on this CPU
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deepspeed_config(cfg)


def test_deepspeed_file_that_agrees_is_merged(tmp_path):
    import json
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2,
                                                                              "overlap_comm": True}}))
    ds = deepspeed_config(_train(deepspeed={"config_file": str(path)}, per_device_batch_size=4,
                                 gradient_accumulation_steps=2, scaling={"num_workers": 2}))
    assert ds["train_batch_size"] == 16 and ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}


def test_offload_without_zero_is_refused():
    with pytest.raises(ConfigError, match="offload_optimizer needs"):
        deepspeed_config(_train(deepspeed={"offload_optimizer": True}))


# ---------------------------------------------------------------- GDRT

def test_group_dro_token_loss_hand_values():
    from recray.train.losses import group_dro_token_loss
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-3.0, -1.0, 0.0, 0.0]], requires_grad=True)
    groups = torch.tensor([[0, 1, 1, -1], [0, 0, -1, -1]])
    loss, group_loss, q, ema = group_dro_token_loss(logps, groups, n_groups=3, tau=0.5, ema=None)
    # L_0 = (1 + 3 + 1) / 3, L_1 = (2 + 0.5) / 2, group 2 absent
    l0, l1 = 5 / 3, 1.25
    assert group_loss[:2].tolist() == pytest.approx([l0, l1]) and torch.isnan(group_loss[2])
    q0 = math.exp(l0 / 0.5) / (math.exp(l0 / 0.5) + math.exp(l1 / 0.5))
    assert q.tolist() == pytest.approx([q0, 1 - q0, 0.0])
    assert loss.item() == pytest.approx(q0 * l0 + (1 - q0) * l1)
    loss.backward()                           # ∇ = Σ_g q_g ∇L_g: a group-0 token gets −q0/3
    assert logps.grad[0, 0].item() == pytest.approx(-q0 / 3)
    assert logps.grad[0, 1].item() == pytest.approx(-(1 - q0) / 2)
    # The EMA: group 1 seen again with loss 3.25 -> 0.9·1.25 + 0.1·3.25; group 2 first seen.
    _, _, _, ema2 = group_dro_token_loss(torch.tensor([[-3.25, -7.0]]), torch.tensor([[1, 2]]),
                                         3, 0.5, ema)
    assert ema2.tolist() == pytest.approx([l0, 0.9 * 1.25 + 0.1 * 3.25, 7.0])
    # Huge τ: the group-balanced mean; one group: the token mean.
    flat, *_ = group_dro_token_loss(logps.detach(), groups, 3, 1e9, None)
    assert flat.item() == pytest.approx((l0 + l1) / 2)
    single, *_ = group_dro_token_loss(logps.detach(), groups.clamp(max=0), 3, 1.0, None)
    assert single.item() == pytest.approx(7.5 / 5)


def test_gdrt_sft_trainer_loss_by_hand_and_one_group_is_trl_loss(tiny, tmp_path):
    """token_groups reach the loss at the right label positions: with one group the
    trainer's loss is TRL's; with groups by token parity it is the hand-computed DRO loss."""
    import datasets
    import pandas as pd

    from recray.train.token_groups import answer_tokens
    from recray.train.worker import make_trainer

    model_dir, prepared = tiny
    df = pd.read_parquet(prepared / "train").head(4)
    plain = [{"prompt": p, "completion": c} for p, c in zip(df["prompt"], df["completion"])]
    job = make_job("sft", model_dir, tmp_path, gdrt={"tau": 0.7, "groups": 2, "ema": 0.9})
    trl = make_trainer(job, datasets.Dataset.from_list(plain), str(tmp_path / "a"))
    tok = trl.processing_class
    split = [answer_tokens(tok, r["prompt"], r["completion"]) for r in plain]
    answers = [a for _, a in split]

    def loss(rows, directory) -> tuple[float, object]:
        trainer = make_trainer(job, datasets.Dataset.from_list(rows), str(tmp_path / directory))
        _randomize_lora(trainer.model, seed=2)
        trainer.model.eval()
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item(), trainer

    reference, _ = loss(plain, "a")
    one, _ = loss([{**r, "token_groups": [0] * len(a)} for r, a in zip(plain, answers)], "b")
    assert one == pytest.approx(reference, abs=1e-6)
    parity = [[t % 2 for t in range(len(a))] for a in answers]
    value, trainer = loss([{**r, "token_groups": g} for r, g in zip(plain, parity)], "c")
    model = trainer.model
    with torch.no_grad():
        nll = {0: [], 1: []}
        for (context, a), g in zip(split, parity):
            logps = torch.log_softmax(model(torch.tensor([context + a])).logits[0], -1)
            for t, (token, group) in enumerate(zip(a, g)):
                nll[group].append(-logps[len(context) + t - 1, token].item())
    l0, l1 = (sum(v) / len(v) for v in (nll[0], nll[1]))
    q0 = 1 / (1 + math.exp((l1 - l0) / 0.7))
    assert value == pytest.approx(q0 * l0 + (1 - q0) * l1, abs=1e-5)


def test_token_groups_align_with_the_trainer_and_split_by_quantiles(tiny, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    from recray.train.token_groups import score_token_groups
    from recray.train.worker import make_trainer

    model_dir, prepared = tiny
    train = pq.read_table(prepared / "train")
    table, stats = score_token_groups(train, str(model_dir), str(model_dir), "movie", 3)
    groups = table.column("token_groups").to_pylist()
    aux = table.column("aux_logp").to_pylist()
    assert [len(g) for g in groups] == [len(a) for a in aux]
    counts = [s["tokens"] for s in stats["groups"]]
    assert sum(counts) == stats["tokens"] and min(counts) > 0      # ties can unbalance them
    flat = sorted(zip((x for a in aux for x in a), (g for gs in groups for g in gs)))
    assert [g for _, g in flat] == sorted(g for _, g in flat)       # groups ordered by a_t
    # The trainer's label positions take exactly these groups (the collator checks counts).
    rows = [{"prompt": p, "completion": c, "token_groups": g}
            for p, c, g in zip(train.column("prompt").to_pylist(),
                               train.column("completion").to_pylist(), groups)]
    job = make_job("sft", model_dir, tmp_path)
    trainer = make_trainer(job, datasets.Dataset.from_list(rows), str(tmp_path / "t"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert ((batch["token_groups"] >= 0) == (batch["labels"] != -100)).all()


def test_auto_precision_follows_the_hardware(monkeypatch):
    """auto: bf16 on GPU workers and on CPUs with bf16 in hardware, fp32 on other CPUs; an
    explicit precision is kept; the generation dtype follows the same rule."""
    from recray import runtime
    from recray.config import GenerateConfig
    from recray.generate.policy import generation_dtype
    for native in (True, False):
        monkeypatch.setattr(runtime, "native_bf16", lambda native=native: native)
        assert precision(_train()) == ("bf16" if native else "fp32")
        assert precision(_train(scaling={"use_gpu": True})) == "bf16"
        assert precision(_train(precision="fp32")) == "fp32"
        assert generation_dtype(GenerateConfig(), on_gpu=False) == ("bfloat16" if native else "float32")
        assert generation_dtype(GenerateConfig(), on_gpu=True) == "bfloat16"
        assert generation_dtype(GenerateConfig(dtype="float32"), on_gpu=False) == "float32"
