"""Mitigation: at inference (prompt-embedding optimization and baselines) and the measures that judge it."""

from .baselines import (
    BASELINES,
    GaussianNoiseInjection,
    RandomNumberAddition,
    RandomTokenAddition,
    WordRepetition,
)
from .embedding import EmbeddingOptimization, NonFiniteLoss
from .result import MitigationResult

__all__ = ["BASELINES", "EmbeddingOptimization", "GaussianNoiseInjection", "MitigationResult", "NonFiniteLoss",
           "RandomNumberAddition", "RandomTokenAddition", "WordRepetition"]
