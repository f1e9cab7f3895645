"""Detection: which prompts make the model replicate training data."""

from .noise_norm import DetectionResult, NoiseNormDetector

__all__ = ["DetectionResult", "NoiseNormDetector"]
