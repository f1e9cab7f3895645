"""Explanation: which prompt tokens carry the memorization."""

from .attribution import EXPLAINERS, AttributionResult, TokenAblation, TokenAttribution

__all__ = ["EXPLAINERS", "AttributionResult", "TokenAblation", "TokenAttribution"]
