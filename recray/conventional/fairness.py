"""BiFair's fairness weights (seed 003, Eqs. 8-11 and Alg. 2; seed-methods.md §4.2-4.3) as
pure torch functions of the group losses and their gradients.

    c = entropy_coefficients(losses)       # Σ_n c_n ∇ℓ_n = ∇(−H_s), H_s the entropy of softmax(ℓ)
    w = min_norm_weights(vectors)          # Frank-Wolfe: the min-norm point of their convex hull
    effective = fair_weights(grads, losses, variant, ...)   # the weight of each ℓ_n in this step
"""

from __future__ import annotations

import torch


def group_losses(per_positive: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """ℓ_n (Eq. 8): the mean loss of the batch's positives whose item is in group n (an item
    in several groups counts in each); a group with no positive in the batch gets 0."""
    counts = membership.sum(0)
    return (per_positive[:, None] * membership).sum(0) / counts.clamp(min=1)


def entropy_coefficients(losses: torch.Tensor) -> torch.Tensor:
    """c_n = p_n (log p_n − Σ_k p_k log p_k), p = softmax(ℓ): ∂(−H_s)/∂ℓ_n, so that
    Σ_n c_n ∇ℓ_n = −∇H_s (the sign check of seed-methods.md §4.2)."""
    p = torch.softmax(losses, 0)
    log_p = torch.log_softmax(losses, 0)
    return p * (log_p - (p * log_p).sum())


def min_norm_weights(vectors: torch.Tensor, iterations: int = 25) -> torch.Tensor:
    """Alg. 2: the w in the simplex minimising ‖Σ_k w_k v_k‖² (rows of `vectors`), by
    Frank-Wolfe from the uniform point with the exact line search on the Gram matrix."""
    gram = vectors @ vectors.T
    w = torch.full((len(vectors),), 1.0 / len(vectors), dtype=gram.dtype, device=gram.device)
    for _ in range(iterations):
        bw = gram @ w
        j = int(torch.argmin(bw))
        wbw = w @ bw
        denominator = wbw - 2 * bw[j] + gram[j, j]
        if denominator <= 1e-12:         # the vertex is the current point: converged
            break
        gamma = ((wbw - bw[j]) / denominator).clamp(0, 1)
        w = (1 - gamma) * w
        w[j] += gamma
    return w


def fair_weights(grads: torch.Tensor, losses: torch.Tensor, variant: str, zeta: float,
                 iterations: int = 25) -> torch.Tensor:
    """The weight w̃_n of each group loss in this step's objective Σ_n w̃_n ℓ_n.

    `grads`: (N, P) the flattened ∇_θ ℓ_n. Variants (seed-methods.md §4.3):
    - "entropy": Frank-Wolfe over {∇ℓ_1..∇ℓ_N, −∇H_s}; the entropy vector's weight is kept
      through its coefficients, w̃_n = w_n + w_{N+1} c_n (ambiguity 1);
    - "eq11": the same weights, but the literal Eq. 11, d = Σ_{n≤N} w_n ∇ℓ_n;
    - "noentropy": Frank-Wolfe over the N group gradients alone (MGDA).
    Every w is first mixed with uniform, (1−ζ) w + ζ/|𝒢| (the "minimum guarantee")."""
    n = len(losses)
    c = entropy_coefficients(losses.detach())
    vectors = grads if variant == "noentropy" else torch.cat([grads, (c @ grads)[None]])
    w = min_norm_weights(vectors, iterations)
    w = (1 - zeta) * w + zeta / len(w)
    if variant == "entropy":
        return w[:n] + w[n] * c
    return w[:n]
