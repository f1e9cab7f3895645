"""Mitigation: at inference (prompt-embedding optimization and baselines) and the measures that judge it."""

from .embedding import (
    BASELINES,
    EmbeddingOptimization,
    GaussianNoiseInjection,
    MitigationResult,
    NonFiniteLoss,
    RandomNumberAddition,
    RandomTokenAddition,
    WordRepetition,
)

__all__ = ["BASELINES", "EmbeddingOptimization", "GaussianNoiseInjection", "MitigationResult", "NonFiniteLoss",
           "RandomNumberAddition", "RandomTokenAddition", "WordRepetition"]
