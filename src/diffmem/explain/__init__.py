"""Explanation: which prompt tokens carry the memorization."""

from .ablation import TokenAblation
from .attribution import TokenAttribution
from .batch import AttributionSet, explain_prompts
from .result import AttributionResult

EXPLAINERS = {"attribution": TokenAttribution, "ablation": TokenAblation}  # by the name the CLI and audit take

__all__ = ["EXPLAINERS", "AttributionResult", "AttributionSet", "explain_prompts", "TokenAblation", "TokenAttribution"]
