"""BiFair's table (seed 003; seed-methods.md §4): an LLM-enhanced recommender over item-title
embeddings, plain, re-weighted, and made fair by BiFair's bi-level training.

    z_i  = embed(title_i)                        learnable item representations Z (outer level)
    e_u  = g_θ(mean_{i ∈ H_u} z_i),  e_i = g_θ(z_i)   projector θ (inner level); LightGCN optional
    s    = cos(e_u, e_i) / τ,  ℓ = InfoNCE against sampled negatives
    ℓ_n  = mean ℓ over the positives of group n;  w̃ = fair_weights(∇_θ ℓ, ℓ)   (fairness.py)
    θ   ← Adam(Σ_n w̃_n ∇_θ ℓ_n)
    Z   ← AdamW(∇_Z L(θ′) − ξ ∇²_{Z,θ} L ∇_θ′ L(θ′)),  θ′ = θ − ξ ∇_θ L   (DARTS, finite differences)

A user is a bag of known items: a prompt sample's history (protocol sequential) or a user's
train items (protocol general). `train` runs one method of VARIANTS; `fit` runs it as a
Ray task; `Trained` scores items for the evaluation code every other recommender uses.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from recray.config import BifairConfig
from recray.conventional.fairness import fair_weights, group_losses
from recray.evaluate.metrics import recall

log = logging.getLogger(__name__)

WEIGHTS, META = "model.safetensors", "bifair.json"


@dataclass(frozen=True)
class Variant:
    sampling: str    # "uniform" over positives, or "stratified": B/N positives per group
    weighting: str   # "mean", "reweight" (inverse group frequency), or a fair_weights variant
    schedule: str    # "theta" (Z frozen), "bilevel" (θ and Z each step), "separate" (θ, then Z)


VARIANTS = {
    "alpharec": Variant("uniform", "mean", "theta"),
    "alpharec-reweight": Variant("uniform", "reweight", "theta"),
    "bifair": Variant("stratified", "entropy", "bilevel"),
    "bifair-noentropy": Variant("stratified", "noentropy", "bilevel"),
    "bifair-eq11": Variant("stratified", "eq11", "bilevel"),
    "bifair-separate": Variant("stratified", "entropy", "separate"),
}


def projector(cfg: BifairConfig, d: int) -> nn.Module:
    if cfg.projector == "linear":
        return nn.Linear(d, cfg.dim, bias=False)
    return nn.Sequential(nn.Linear(d, cfg.hidden), nn.LeakyReLU(), nn.Linear(cfg.hidden, cfg.dim))


@dataclass
class Bags:
    """Rows of users, each the (padded) indices of its known items with weights 1/|H_u|."""
    items: torch.Tensor      # (rows, L) long, 0-padded
    weights: torch.Tensor    # (rows, L) float, 0 on padding

    @classmethod
    def of(cls, lists: list[list[int]]) -> "Bags":
        width = max(1, max(len(r) for r in lists))
        items = torch.zeros(len(lists), width, dtype=torch.long)
        weights = torch.zeros(len(lists), width)
        for row, known in enumerate(lists):
            items[row, :len(known)] = torch.tensor(known, dtype=torch.long)
            weights[row, :len(known)] = 1.0 / max(1, len(known))
        return cls(items, weights)

    def mean(self, z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        items, weights = (self.items, self.weights) if rows is None else (self.items[rows], self.weights[rows])
        return nn.functional.embedding_bag(items, z, per_sample_weights=weights, mode="sum")


def normalized_graph(bags: list[list[int]], n_items: int) -> torch.Tensor:
    """LightGCN's D^-1/2 A D^-1/2 over the user-item graph (users first, then items)."""
    users = np.repeat(np.arange(len(bags)), [len(b) for b in bags])
    items = np.concatenate([np.asarray(b, dtype=np.int64) for b in bags]) + len(bags)
    rows, cols = np.r_[users, items], np.r_[items, users]
    degree = np.bincount(rows, minlength=len(bags) + n_items).astype(np.float32)
    values = 1.0 / np.sqrt(degree[rows] * degree[cols])
    size = len(bags) + n_items
    return torch.sparse_coo_tensor(np.stack([rows, cols]), values, (size, size),
                                   check_invariants=True).coalesce()


class Encoder:
    """(users, items) in behaviour space for a θ (a parameter dict) and a Z."""

    def __init__(self, module: nn.Module, bags: Bags, graph: torch.Tensor | None, layers: int):
        self.module, self.bags, self.graph, self.layers = module, bags, graph, layers

    def __call__(self, params: dict, z: torch.Tensor, rows: torch.Tensor | None = None):
        project = lambda x: functional_call(self.module, params, (x,))   # noqa: E731
        if not self.layers:
            return project(self.bags.mean(z, rows)), project(z)
        nodes = torch.cat([project(self.bags.mean(z)), project(z)])
        total = nodes
        for _ in range(self.layers):
            nodes = torch.sparse.mm(self.graph, nodes)
            total = total + nodes
        nodes = total / (self.layers + 1)
        users, items = nodes[:len(self.bags.items)], nodes[len(self.bags.items):]
        return (users if rows is None else users[rows]), items


def info_nce(users: torch.Tensor, items: torch.Tensor, positives: torch.Tensor,
             negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per positive: −log softmax of its cosine score against the batch's shared negatives."""
    u = nn.functional.normalize(users, dim=-1)
    i = nn.functional.normalize(items, dim=-1)
    positive = (u * i[positives]).sum(-1, keepdim=True) / temperature
    negative = u @ i[negatives].T / temperature
    return torch.logsumexp(torch.cat([positive, negative], 1), 1) - positive[:, 0]


def finite_difference_hvp(loss_of, params: dict, z: torch.Tensor, v: dict) -> torch.Tensor:
    """∇²_{Z,θ} L · v ≈ (∇_Z L(θ + εv, Z) − ∇_Z L(θ − εv, Z)) / 2ε, ε = 0.01 / ‖v‖ (Eq. 7)."""
    norm = torch.sqrt(sum((t ** 2).sum() for t in v.values()))
    eps = 0.01 / max(float(norm), 1e-12)
    plus = torch.autograd.grad(loss_of({k: p + eps * v[k] for k, p in params.items()}, z), z)[0]
    minus = torch.autograd.grad(loss_of({k: p - eps * v[k] for k, p in params.items()}, z), z)[0]
    return (plus - minus) / (2 * eps)


@dataclass
class Positives:
    rows: torch.Tensor           # (P,) the user row of each positive
    items: torch.Tensor          # (P,) its item index
    membership: torch.Tensor     # (n_items, N) float 0/1: item in group n
    weights: torch.Tensor        # (P,) inverse group frequency, mean 1 (alpharec-reweight)

    @classmethod
    def of(cls, rows: list[int], items: list[int], membership: torch.Tensor) -> "Positives":
        rows_t, items_t = torch.tensor(rows), torch.tensor(items)
        member = membership[items_t]
        inverse = member.sum(0).clamp(min=1).reciprocal() * len(items) / membership.shape[1]
        per_positive = (member * inverse).sum(1) / member.sum(1).clamp(min=1)
        per_positive = torch.where(member.sum(1) > 0, per_positive, torch.ones(()))
        return cls(rows_t, items_t, membership, per_positive / per_positive.mean())


def _batches(positives: Positives, variant: Variant, batch_size: int, rng: torch.Generator):
    """One epoch of positive indices: ceil(P / B) batches, uniform or group-stratified."""
    n = len(positives.items)
    steps = math.ceil(n / batch_size)
    if variant.sampling == "uniform":
        yield from torch.randperm(n, generator=rng).split(batch_size)
        return
    member = positives.membership[positives.items]
    pools = [torch.nonzero(member[:, g]).flatten() for g in range(member.shape[1])]
    pools = [p for p in pools if len(p)]
    per_group = max(1, batch_size // len(pools))
    for _ in range(steps):
        yield torch.cat([p[torch.randint(len(p), (per_group,), generator=rng)] for p in pools])


@dataclass
class EvalRows:
    """Rows to rank the catalog for: users, their targets, and items masked from the ranking."""
    rows: torch.Tensor           # user rows of the encoder's bags
    targets: list[list[int]]
    masked: list[list[int]]      # known items not to recommend ([] in the sequential protocol)


def top_items(scores: torch.Tensor, rows: EvalRows, k: int = 20) -> list[list[int]]:
    """Each row's k best items by `scores`, its masked (known) items left out."""
    scores = scores.clone()
    for r, masked in enumerate(rows.masked):
        scores[r, masked] = -torch.inf
    return scores.topk(k, dim=1).indices.tolist()


def recall_at(encoder: Encoder, params: dict, z: torch.Tensor, rows: EvalRows, k: int = 20) -> float:
    with torch.no_grad():
        return recall(top_items(item_scores(encoder, params, z, rows.rows), rows, k), rows.targets, k)


def item_scores(encoder: Encoder, params: dict, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    users, items = encoder(params, z, rows)
    return nn.functional.normalize(users, dim=-1) @ nn.functional.normalize(items, dim=-1).T


def train(method: str, z0: np.ndarray, encoder_parts: tuple[Bags, list[list[int]] | None],
          positives: Positives, valid: EvalRows, cfg: BifairConfig, out: Path) -> dict:
    """Train `method` (a VARIANTS key) and write the best epoch by valid Recall@20.
    `encoder_parts`: the users' bags and, for LightGCN, the train bags of the graph."""
    from safetensors.torch import save_file
    variant = VARIANTS[method]
    torch.manual_seed(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    bags, graph_bags = encoder_parts
    module = projector(cfg, z0.shape[1])
    graph = normalized_graph(graph_bags, len(z0)) if cfg.graph_layers else None
    encoder = Encoder(module, bags, graph, cfg.graph_layers)
    theta = dict(module.named_parameters())
    z = nn.Parameter(torch.tensor(z0, dtype=torch.float32))
    steps_per_epoch = math.ceil(len(positives.items) / cfg.batch_size)
    opt_theta = torch.optim.Adam(theta.values(), lr=cfg.lr_theta)
    opt_z = torch.optim.AdamW([z], lr=cfg.lr_z, betas=(0.9, 0.999), weight_decay=cfg.weight_decay_z)
    schedules = {name: torch.optim.lr_scheduler.PolynomialLR(o, cfg.max_epochs * steps_per_epoch, power=0.9)
                 for name, o in (("theta", opt_theta), ("z", opt_z))}
    xi = cfg.xi or cfg.lr_theta
    # "separate": θ alone for the first half of the epochs, then Z alone with θ frozen.
    switch = cfg.max_epochs // 2 if variant.schedule == "separate" else None

    best, best_epoch, best_state, curve = -1.0, 0, None, []
    start = time.time()
    for epoch in range(1, cfg.max_epochs + 1):
        learn = {"theta": ("theta",), "bilevel": ("theta", "z")}.get(variant.schedule) or (
            ("theta",) if epoch <= switch else ("z",))
        sums = np.zeros(3)
        for batch in _batches(positives, variant, cfg.batch_size, rng):
            negatives = torch.randint(len(z0), (cfg.negatives,), generator=rng)
            stats = _step(encoder, theta, z, positives, batch, negatives, variant, cfg, xi,
                          learn, opt_theta, opt_z)
            sums += stats
            for name in learn:
                schedules[name].step()
        score = recall_at(encoder, theta, z, valid)
        curve.append({"epoch": epoch, "loss": round(sums[0] / steps_per_epoch, 4),
                      "worst_group_loss": round(sums[1] / steps_per_epoch, 4),
                      "group_loss_spread": round(sums[2] / steps_per_epoch, 4),
                      "valid_recall@20": round(score, 5)})
        if score > best:
            best, best_epoch = score, epoch
            best_state = {"items": z.detach().clone(),
                          **{f"projector.{k}": v.detach().clone() for k, v in theta.items()}}
        log.info("%s epoch %d/%d: loss %.4f, worst group %.4f, valid Recall@20 %.4f (best %.4f at %d), "
                 "%.0f positives/s", method, epoch, cfg.max_epochs, curve[-1]["loss"],
                 curve[-1]["worst_group_loss"], score, best, best_epoch,
                 epoch * len(positives.items) / (time.time() - start))
        if epoch - best_epoch >= cfg.patience and (switch is None or epoch > switch):
            break
    out.mkdir(parents=True, exist_ok=True)
    save_file(best_state, str(out / WEIGHTS))
    in_no_group = int((positives.membership[positives.items].sum(1) == 0).sum())
    record = {"method": method, "best_epoch": best_epoch, "valid_recall@20": best,
              "epochs_run": len(curve), "positives": len(positives.items),
              # a stratified batch never draws these (their item is in no group)
              "positives_never_sampled": in_no_group if variant.sampling == "stratified" else 0,
              "seconds": round(time.time() - start, 1), "curve": curve}
    return record


def _step(encoder, theta, z, positives, batch, negatives, variant, cfg, xi, learn,
          opt_theta, opt_z) -> np.ndarray:
    """One batch: fair weights (held fixed for the step), the inner θ step, the outer Z step.
    Returns (loss, worst group loss, max − min group loss)."""
    rows, items = positives.rows[batch], positives.items[batch]
    membership = positives.membership[items]
    present = membership.sum(0) > 0

    def per_positive(params, zz):
        users, all_items = encoder(params, zz, rows)
        return info_nce(users, all_items, items, negatives, cfg.temperature)

    losses = per_positive(theta, z)
    groups = group_losses(losses, membership)[present]
    if variant.weighting in ("mean", "reweight"):
        sample_w = positives.weights[batch] if variant.weighting == "reweight" else torch.ones(len(batch))
        objective = lambda ls: (ls * sample_w).mean()                    # noqa: E731
    else:
        grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            groups[n], list(theta.values()), retain_graph=True)]) for n in range(len(groups))])
        w = fair_weights(grads, groups.detach(), variant.weighting, cfg.zeta, cfg.fw_iterations).detach()
        objective = lambda ls: (w * group_losses(ls, membership)[present]).sum()   # noqa: E731

    loss_of = lambda params, zz: objective(per_positive(params, zz))    # noqa: E731
    if "theta" in learn:
        grad = torch.autograd.grad(objective(losses), list(theta.values()))
        opt_theta.zero_grad()
        for p, g in zip(theta.values(), grad):
            p.grad = g
        opt_theta.step()
    if "z" in learn:
        if "theta" in learn:            # bi-level: the unrolled θ′ and its second-order term
            grad = torch.autograd.grad(loss_of(theta, z), list(theta.values()))
            unrolled = {k: (p - xi * g).detach().requires_grad_() for (k, p), g in zip(theta.items(), grad)}
            g_z, *v = torch.autograd.grad(loss_of(unrolled, z), [z, *unrolled.values()])
            hvp = finite_difference_hvp(loss_of, {k: p.detach() for k, p in theta.items()}, z,
                                        dict(zip(theta, v)))
            g_z = g_z - xi * hvp
        else:                           # "separate", second phase: θ frozen
            g_z = torch.autograd.grad(loss_of(theta, z), z)[0]
        opt_z.zero_grad()
        z.grad = g_z
        opt_z.step()
    g = groups.detach()
    return np.array([float(losses.detach().mean()), float(g.max()), float(g.max() - g.min())])
