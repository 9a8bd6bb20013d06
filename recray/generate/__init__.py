"""Generation for the whole system (negatives and evaluation): one interface, two backends.

    from recray.generate import GenerationPool, Policy
    with GenerationPool(cfg.generate, base_model) as pool:
        table = pool.generate(prompts, Policy(base_model, adapter))

See docs/generation.md.
"""

from recray.generate.policy import Policy
from recray.generate.pool import GenerationPool, generate, resolve_backend

__all__ = ["GenerationPool", "Policy", "generate", "resolve_backend"]
