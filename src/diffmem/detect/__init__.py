"""Detection: which prompts make the model replicate training data."""

from .calibration import Calibration, CalibrationMismatch
from .noise_norm import DetectionResult, NoiseNormDetector
from .seed_consistency import SeedConsistencyDetector

__all__ = ["Calibration", "CalibrationMismatch", "DetectionResult", "NoiseNormDetector", "SeedConsistencyDetector"]
