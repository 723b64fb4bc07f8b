"""Shared fixtures."""
import pytest

from helpers import DICOMDIR_TREE, run_pipeline


@pytest.fixture(scope="session")
def dicomdir_run(tmp_path_factory):
    """One pipeline run over pydicom's dicomdirtests tree (several patients and studies)."""
    out = tmp_path_factory.mktemp("dicomdirtests-out")
    summary = run_pipeline(DICOMDIR_TREE, out)
    return out, summary
