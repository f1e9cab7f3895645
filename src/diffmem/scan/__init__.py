"""Training-set scan: duplicated images, duplicated captions, word-level trigger phrases, and the
per-sample memorization score, streamed in resumable shards."""

from .scanner import CHECKS, DatasetScanner, ScanResult, ScanSettings, analyse
from .sources import ListSource, open_source

__all__ = ["CHECKS", "DatasetScanner", "ScanResult", "ScanSettings", "analyse", "ListSource", "open_source"]
