"""The three kinds of memorization: explicit intended, implicit intended, unintended."""

from .expectations import CaptionCooccurrence, ExpectationMap, SentenceEmbeddingExpectation
from .extractors import ChatExtractor, CLIPZeroShotExtractor, MemLabExtractor, VLMExtractor
from .profiler import MemorizationProfiler, ProfileResult
from .tracing import TrainingTracer

__all__ = ["CaptionCooccurrence", "ChatExtractor", "CLIPZeroShotExtractor", "ExpectationMap", "MemLabExtractor", "VLMExtractor",
           "MemorizationProfiler", "ProfileResult", "SentenceEmbeddingExpectation", "TrainingTracer"]
