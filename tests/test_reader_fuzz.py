"""Differential fuzz in the suite: the fast reader against pydicom on seeded mutants of real files.

A bounded run (well under a minute); scripts/fuzz_readers.py runs the long campaign with the same
mutator and check (tests/mutants.py). pydicom is the authority: no exception may escape, no file
may be accepted that pydicom rejects, no attribute may differ where pydicom reads the file.
"""
from __future__ import annotations

import io
import os
import random

import mutants
import pytest
import specs

from beam_pipeline.fhir import keywords

SPECS = {"default": keywords.header_spec(), "core": specs.CORE_SPEC, "wide": specs.WIDE_SPEC}
MUTANTS_PER_SEED = 2_500


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fast_reader_agrees_with_pydicom_on_mutants(seed, element_loop):
    if element_loop == "python" and seed > 2:
        pytest.skip("two seeds suffice for the pure-Python loop (the long campaign runs both)")
    findings = []

    def on_finding(index, name, kinds, spec_name, data, found, facts):
        findings.append((index, name, kinds, spec_name, found, facts))

    counts = mutants.campaign(seed, MUTANTS_PER_SEED, SPECS, on_finding)
    assert findings == []
    assert counts["mutants"] == counts["agreements"] == MUTANTS_PER_SEED
    # The run means something: the scanner itself read many mutants, pydicom accepted and
    # rejected many, and several fallback causes occurred.
    assert counts["fast:scanner"] > MUTANTS_PER_SEED // 10
    assert counts["pydicom:instance"] > MUTANTS_PER_SEED // 10
    assert counts["pydicom:error:unreadable"] + counts["pydicom:error:truncated"] > MUTANTS_PER_SEED // 10
    assert sum(1 for key in counts if key.startswith("fast:reader-fallback:")) >= 5


def test_ci_builds_the_compiled_element_loop():
    """setup.py builds it optionally (users without a compiler get the pure-Python loop); CI has
    gcc, so a build that silently failed there would hide the loop this suite must cover."""
    from beam_pipeline.dicom import fast_header

    if not os.environ.get("CI"):
        pytest.skip("only CI promises a C compiler")
    assert fast_header._compiled_walk is not None


def test_mutations_are_seeded_and_varied():
    seeds = mutants.load_seeds()
    assert mutants.mutate(seeds[0], random.Random(5)) == mutants.mutate(seeds[0], random.Random(5))
    rng = random.Random(9)
    kinds = {kind for _ in range(400) for kind in mutants.mutate(rng.choice(seeds), rng)[1]}
    assert kinds == set(mutants._MUTATORS)
    assert all(seed.element_starts for seed in seeds)


def _scan_both_ways(data: bytes, spec, monkeypatch) -> tuple:
    """fast_header.scan with the compiled loop and with the Python loop: result and budget left."""
    from beam_pipeline.dicom import fast_header
    from beam_pipeline.dicom.header_io import Budget, HeaderTooLarge

    outcomes = []
    for loop in (fast_header._compiled_walk, None):
        monkeypatch.setattr(fast_header, "_compiled_walk", loop)
        budget = Budget(256 * 1024)  # small: budget exhaustion happens too
        stream = io.BytesIO(data)
        stream.seek(min(len(data), 4096))
        try:
            result = fast_header.scan(data[:4096], stream, spec, len(data), budget)
        except HeaderTooLarge:
            result = "header-too-large"
        outcomes.append((result, budget.left))
    return tuple(outcomes)


@pytest.mark.parametrize("seed", [21, 22])
def test_compiled_and_python_loops_give_the_same_scan(seed, monkeypatch):
    """The compiled loop only walks what the Python loop would walk the same way: on mutants the two
    give the same record, the same decline cause, the same truncation verdict and charge the budget
    alike (a stricter check than agreeing with pydicom, which allows several fallback causes)."""
    from beam_pipeline.dicom import fast_header

    if fast_header._compiled_walk is None:
        pytest.skip("the compiled element loop is not built here")
    rng = random.Random(seed)
    seeds = [s for s in mutants.load_seeds() if s.data[128:132] == b"DICM"]
    differing, scanned = [], 0
    for index in range(20_000):
        data, kinds = mutants.mutate(rng.choice(seeds), rng)
        for spec_name, spec in SPECS.items():
            compiled, python = _scan_both_ways(data, spec, monkeypatch)
            scanned += not isinstance(compiled[0], (str, fast_header.Declined))
            if compiled != python:
                differing.append((index, kinds, spec_name, compiled, python))
    assert differing == []
    assert scanned > 6_000  # many mutants were read through, not only declined
