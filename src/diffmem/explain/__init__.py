"""Explanation: which prompt tokens carry the memorization."""

from .attribution import AttributionResult, TokenAblation, TokenAttribution

__all__ = ["AttributionResult", "TokenAblation", "TokenAttribution"]
