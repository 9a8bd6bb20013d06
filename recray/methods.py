"""Every method recray runs, as a row of one table: which of the loop's stages it runs
(recray.loop), with which negatives and loss, and what it adds (a judger, a prior, a
reference recommender). `method_config` applies a row's switches to a run config; every
stage sees the config through it. `check_config` refuses, before anything starts, the
combinations that would stop a run part-way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from recray.config import Config
from recray.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    about: str                  # one line for `recray methods` and docs/loop.md
    loop: bool = True           # False: π_0 only
    sft: bool = True            # the in-loop SFT step
    dpo: bool = True            # the DPO step
    negatives: str = "self"     # "self": the policy's answers; "random": catalog titles;
                                # "semantic": the catalog titles nearest the target
    k: int | None = None        # negatives per prompt when generate.n_negatives is not set
    dmpo: bool = False          # DMPO's objective over the k negatives (loop.dmpo_form)
    one_pass: bool = False      # DMPO, SDPO: a single DPO pass (T = 1)
    reweight: bool = False      # RW (IFairLRS): re-weighted initial SFT
    loss: str | None = None     # its DPO loss (train.multi_negative_loss), e.g. RosePO's
    gdrt: bool = False          # GDRT: π_0's SFT is group DRO over answer-token groups
    judge: bool = False         # UFO-like: a judger stage weights SFT samples and DPO pairs,
                                # and a verdict stage may revert or stop (recray.judge)
    recommender: str | None = None   # a reference row with no LLM (recray.conventional)
    prior: str | None = None    # D3: a text-free recommender whose scores guide decoding


METHODS = {
    "sprec": Method("initial SFT, then T × (self-play negatives → SFT → DPO)"),
    "bigrec": Method("initial SFT only", loop=False),
    "sprec-nodpo": Method("SPRec without the DPO step (no negatives generated)", dpo=False),
    "sprec-nosft": Method("SPRec without the SFT step (DPO's reference is π_{t-1})", sft=False),
    "sprec-rn": Method("SPRec with negatives drawn uniformly from the catalog",
                       negatives="random"),
    "dmpo": Method("one DPO pass after π_0, k = 3 random negatives, DMPO's mean-reward loss "
                   "(loop.dmpo_form)", sft=False, negatives="random", k=3, dmpo=True,
                   one_pass=True),
    "sdpo": Method("one DPO pass after π_0, k = 3 random negatives, softmax (S-DPO) loss",
                   sft=False, negatives="random", k=3, one_pass=True),
    "rosepo": Method("one DPO pass after π_0 against the catalog title nearest each target, "
                     "with RosePO's personalised label smoothing (train.rosepo)", sft=False,
                     negatives="semantic", one_pass=True, loss="rosepo"),
    "gdrt": Method("initial SFT as group DRO over answer tokens grouped by how predictable "
                   "they are without the history (train.gdrt)", loop=False, gdrt=True),
    "rw": Method("initial SFT with IFairLRS re-weighting only", loop=False, reweight=True),
    "d3": Method("π_0 (BIGRec) decoded over the catalog's titles without length "
                 "normalisation, SASRec's item scores added with weight α "
                 "(evaluate.decoding.prior_weight)", loop=False, prior="sasrec"),
    "ufo": Method("UFO-like: SPRec's loop with a judger weighting SFT samples and DPO pairs by "
                  "the group unfairness of the policy's own grounded answers, and a revert/stop "
                  "rule on valid (ufo)", judge=True),
    "mostpop": Method("no LLM: the most frequent train-split targets, the same list for "
                      "everyone", loop=False, recommender="mostpop"),
    "random": Method("no LLM: a seeded uniform ranking per sample", loop=False,
                     recommender="random"),
    "sasrec": Method("no LLM: item-ID SASRec on the train subset, early-stopped on valid",
                     loop=False, recommender="sasrec"),
    "mostpop-general": Method("no LLM: MostPop under BiFair's general protocol (its train "
                              "counts, each user's known items masked)", loop=False,
                              recommender="mostpop-general"),
    "alpharec": Method("no LLM training: an MLP (or linear, bifair.projector) over the titles' "
                       "embeddings, InfoNCE; BiFair's unfair baseline", loop=False,
                       recommender="alpharec"),
    "alpharec-reweight": Method("alpharec with each positive weighted by its group's inverse "
                                "frequency (BiFair's \"Reweight\")", loop=False,
                                recommender="alpharec-reweight"),
    "bifair": Method("alpharec trained bi-level: fair group weights (Frank-Wolfe + entropy) on "
                     "the projector, DARTS-style steps on the item representations (bifair)",
                     loop=False, recommender="bifair"),
    "bifair-separate": Method("bifair ablation: the projector first, then the item "
                              "representations with the projector frozen", loop=False,
                              recommender="bifair-separate"),
    "bifair-noentropy": Method("bifair ablation: Frank-Wolfe over the group gradients only "
                               "(no entropy objective)", loop=False, recommender="bifair-noentropy"),
    "bifair-eq11": Method("bifair ablation: the literal Eq. 11 (the entropy vector's weight "
                          "dropped from the step)", loop=False, recommender="bifair-eq11"),
}


def method_config(cfg: Config) -> Config:
    """`cfg` with its method's switches applied, as every stage of the run sees it: RW's
    re-weighting, the method's negatives and their number k (unless generate.n_negatives
    is set), and its DPO loss (DMPO's, RosePO's)."""
    method = METHODS[cfg.loop.method]
    out = cfg.model_copy(deep=True)
    out.train.reweight = cfg.train.reweight or method.reweight
    out.generate.source = method.negatives
    out.generate.ground = cfg.generate.ground or method.judge   # the judger reads catalog items
    if method.k is not None and "n_negatives" not in cfg.generate.model_fields_set:
        out.generate.n_negatives = method.k
    if method.dmpo and cfg.loop.dmpo_form == "mean_reward":
        out.train.multi_negative_loss = "mean_reward"
    if method.loss:
        out.train.multi_negative_loss = method.loss
    if method.prior:            # D3 (seed-methods.md §5.2): 4 beams over the titles, α = 0.25
        out.generate.constrain_to_catalog = True
        decoding, chosen = out.evaluate.decoding, cfg.evaluate.decoding.model_fields_set
        decoding.prior_weight = decoding.prior_weight if "prior_weight" in chosen else 0.25
        decoding.mode = decoding.mode if "mode" in chosen else "beam"
    return out


def pairs_per_negative(cfg: Config) -> bool:
    """DMPO's mean_pairs form: one standard DPO pair per negative."""
    return METHODS[cfg.loop.method].dmpo and cfg.loop.dmpo_form == "mean_pairs"


def planned_iterations(cfg: Config) -> int:
    """The last iteration a run of `cfg` evaluates (0: π_0 only)."""
    method = METHODS[cfg.loop.method]
    return 0 if not method.loop else (1 if method.one_pass else cfg.loop.iterations)


def check_config(cfg: Config) -> None:
    """Key combinations that would stop a run part-way (after π_0 is trained), refused
    before anything starts, and a set N that overrides a method's own k, said once; a
    sweep checks every trial config with it too."""
    from recray.generate.negatives import negatives_decoding
    method = METHODS[cfg.loop.method]
    looping = planned_iterations(cfg) > 0
    if looping and method.dpo and method.negatives == "self":
        negatives_decoding(cfg.generate.decoding, cfg.generate.n_negatives, cfg.loop.seed)
    if looping and method.sft and cfg.train.reweight:
        raise ConfigError(f"train.reweight=true re-weights π_0's SFT on the prepared split, and "
                          f"loop.method={cfg.loop.method} also runs SFT steps on each iteration's "
                          f"samples, which RW does not define: use loop.method=rw (RW's π_0), or "
                          f"drop train.reweight")
    scorer = cfg.train.gdrt.scorer
    if method.gdrt and scorer and not ((Path(scorer) / "adapter_config.json").exists()
                                       or (Path(scorer) / "config.json").exists()):
        raise ConfigError(f"train.gdrt.scorer={scorer}: no LoRA adapter (adapter_config.json) or "
                          f"model (config.json) there; point it at a BIGRec π_0 (a run's "
                          f"it0/policy/adapter), or leave it unset to train one")
    if (method.recommender or "").startswith(("alpharec", "bifair")) and cfg.bifair.graph_layers \
            and cfg.bifair.protocol == "sequential":
        raise ConfigError("bifair.graph_layers: LightGCN propagates over the user-item graph of "
                          "bifair.protocol=general; prompt samples (protocol sequential) have no "
                          "such graph: set bifair.graph_layers=0 or bifair.protocol=general")
    if method.k is not None and "n_negatives" in cfg.generate.model_fields_set \
            and cfg.generate.n_negatives != method.k:
        log.warning("loop.method=%s takes generate.n_negatives=%d as set (its own k is %d)",
                    cfg.loop.method, cfg.generate.n_negatives, method.k)
    splits = cfg.evaluate.splits
    if method.judge and "valid" not in splits:
        raise ConfigError(f"loop.method={cfg.loop.method} decides after each iteration on the "
                          f"valid split whether to keep or stop: evaluate.splits needs valid "
                          f"(got {splits})")
    if cfg.evaluate.rerank.enabled and (method.recommender or "valid" not in splits
                                        or splits.index("valid") > 0):
        raise ConfigError("evaluate.rerank re-ranks grounded LLM answers with a penalty fitted "
                          "on valid: it needs an LLM method and evaluate.splits starting with "
                          f"valid (got loop.method={cfg.loop.method}, evaluate.splits={splits})")
    if "source" in cfg.generate.model_fields_set and cfg.generate.source != method.negatives:
        raise ConfigError(f"generate.source={cfg.generate.source}: in `recray run` the method "
                          f"chooses the negatives (loop.method={cfg.loop.method} uses "
                          f"{method.negatives!r}); generate.source is for `recray generate "
                          f"--negatives` alone: remove it")
