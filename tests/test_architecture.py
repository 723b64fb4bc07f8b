"""The package's wings and their one-way imports hold (``[tool.importlinter]`` in pyproject.toml):
``lint-imports`` passes on the tree, and fails when an import breaks a rule."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the tree under test, ahead of the editable install
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_package_keeps_its_contracts():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("beam_pipeline/dicom/fields.py", "from beam_pipeline.fhir import mii", "Reading headers knows no FHIR"),
    ("beam_pipeline/fhir/study.py", "from beam_pipeline.sources import files", "Wings:"),
    ("beam_pipeline/fhir/bundles.py", "from beam_pipeline.run import core", "Wings:"),
    ("beam_pipeline/sources/gcs.py", "import apache_beam", "Only the run imports Apache Beam"),
])
def test_an_import_against_the_rules_fails(tmp_path, module, line, contract):
    for part in ("beam_pipeline", "terminologies"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # against the rules\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    broken = [text for text in done.stdout.splitlines() if text.endswith("BROKEN")]
    assert broken, done.stdout[-3000:]
    assert contract in done.stdout.split("Broken contracts", 1)[-1], done.stdout[-3000:]
    assert line.split()[-1] in done.stdout  # the report names the offending import


def test_the_glob_meaning_is_beams():
    """Listing no longer goes through Beam's FileSystems; its glob reading must stay the same."""
    import random

    from apache_beam.io.filesystem import FileSystem

    from beam_pipeline.sources.files import glob_regex

    rng = random.Random(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20000):
            pattern = "".join(rng.choice("ab/*?[]!^\\.-x") for _ in range(rng.randint(0, 12)))
            assert glob_regex(pattern) == FileSystem.translate_pattern(pattern), pattern
