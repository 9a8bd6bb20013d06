"""recray: SPRec self-play debiasing of LLM recommenders, distributed with Ray."""

__version__ = "0.1.0"
