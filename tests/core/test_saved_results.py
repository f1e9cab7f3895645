"""Every result's ``load`` turns a missing, foreign or damaged file into one InputError that names
the path and what was expected: before, users saw KeyError('prompts'), a JSON parser's message
or NotADirectoryError."""

import json

import pytest

from diffmem.bench.explain import ExplainBenchResult
from diffmem.bench.mitigate import MitigateBenchResult
from diffmem.categorize.profiler import ProfileResult
from diffmem.core.errors import InputError
from diffmem.core.results import reading_saved
from diffmem.detect.noise_norm import DetectionResult
from diffmem.explain.batch import AttributionSet
from diffmem.explain.result import AttributionResult
from diffmem.mitigate.result import MitigationResult
from diffmem.report.audit import AuditResult
from diffmem.scan.scanner import ScanResult
from diffmem.scan.verify import TriggerVerification

# (class, the file a saved folder holds, or None for a result saved as one file)
RESULTS = [
    (DetectionResult, None), (AttributionResult, None), (AttributionSet, None),
    (MitigationResult, "mitigation.json"), (ProfileResult, "profile.json"), (ScanResult, "scan_summary.json"),
    (TriggerVerification, "trigger_verification.json"), (AuditResult, "audit.json"),
    (ExplainBenchResult, "bench_explain.json"), (MitigateBenchResult, "bench_mitigate.json"),
]
DAMAGED = {"not JSON": "garbage", "a JSON list": json.dumps([1, 2]), "an empty object": "{}"}


@pytest.mark.parametrize("cls, inner", RESULTS, ids=[c.__name__ for c, _ in RESULTS])
def test_loading_what_is_not_a_saved_result_is_a_clear_error(tmp_path, cls, inner):
    for case, text in DAMAGED.items():
        target = tmp_path / case.replace(" ", "_")
        if inner:
            target.mkdir()
            (target / inner).write_text(text)
        else:
            target = target.with_suffix(".json")
            target.write_text(text)
        with pytest.raises(InputError, match=str(target.name)):
            cls.load(target)
    with pytest.raises(InputError, match="nope"):
        cls.load(tmp_path / "nope")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="a_file"):
        cls.load(a_file)


def test_a_damage_without_words_is_named_by_its_kind_alone(tmp_path):
    # the reader's message gave the kind and then "(IndexError: )" where the error's words would be
    with pytest.raises(InputError, match=r"is not a saved scan \(IndexError\)$"):
        with reading_saved(tmp_path / "scan", "scan"):
            raise IndexError()
