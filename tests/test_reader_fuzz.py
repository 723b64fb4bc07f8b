"""Differential fuzz in the suite: the fast reader against pydicom on seeded mutants of real files.

A bounded run (well under a minute); scripts/fuzz_readers.py runs the long campaign with the same
mutator and check (tests/mutants.py). pydicom is the authority: no exception may escape, no file
may be accepted that pydicom rejects, no attribute may differ where pydicom reads the file.
"""
from __future__ import annotations

import os
import random

import pytest

from beam_pipeline import fields
import mutants
import specs

SPECS = {"default": fields.default_spec(), "core": specs.CORE_SPEC, "wide": specs.WIDE_SPEC}
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
    from beam_pipeline import fast_header

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
