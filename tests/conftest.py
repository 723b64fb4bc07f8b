"""Shared fixtures."""
import pytest
from helpers import DICOMDIR_TREE, run_pipeline


@pytest.fixture(scope="session")
def dicomdir_run(tmp_path_factory):
    """One pipeline run over pydicom's dicomdirtests tree (several patients and studies)."""
    out = tmp_path_factory.mktemp("dicomdirtests-out")
    summary = run_pipeline(DICOMDIR_TREE, out)
    return out, summary


# --- The fast scanner's two element loops ------------------------------------------------------

@pytest.fixture(params=["compiled", "python"])
def element_loop(request, monkeypatch):
    """Runs a test with the compiled element loop (beam_pipeline/_walk.c, the default where it is
    built) and again with the pure-Python one (where it is not): both must give the same results."""
    from beam_pipeline.dicom import fast_header

    if request.param == "compiled":
        if fast_header._compiled_walk is None:
            pytest.skip("the compiled element loop is not built here (no C compiler at install time)")
    else:
        monkeypatch.setattr(fast_header, "_compiled_walk", None)
    return request.param


# --- Google Cloud: everything stays on loopback ------------------------------------------------

def pytest_configure(config):
    """No test may reach a real Google endpoint or metadata server, not even by a missing setting:
    a stray metadata lookup goes to a closed loopback port, credentials are never found on disk."""
    import os
    import tempfile

    from gcs_emulator import closed_loopback_address, is_loopback_url

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator and not is_loopback_url(emulator):
        raise pytest.UsageError(f"STORAGE_EMULATOR_HOST={emulator} is not a loopback address")
    closed = closed_loopback_address()
    os.environ.update({"GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "NO_GCE_CHECK": "true",
                       "CLOUDSDK_CONFIG": tempfile.mkdtemp(prefix="no-gcloud-config-")})
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A GCS emulator on a free loopback port with STORAGE_EMULATOR_HOST pointing at it (inherited
    by subprocesses) and a bucket ``test-bucket``; yields the emulator."""
    from gcs_emulator import GcsEmulator, offline_environment, patched_environ

    with GcsEmulator() as emulator, patched_environ(offline_environment(emulator.url)):
        emulator.create_bucket("test-bucket")
        yield emulator


@pytest.fixture(scope="session")
def gcs_client(gcs_emulator):
    from gcs_emulator import anonymous_client

    return anonymous_client()


# --- The closing line: what was skipped, and what to install for it -------------------------------

_CLOSING_LINE = pytest.StashKey[str]()
_JAR_VARIABLE = {"flink": "BEAM_FLINK_JOB_SERVER_JAR", "spark": "BEAM_SPARK_JOB_SERVER_JAR"}


def skipped_component(reason: str) -> str:
    """The component a skip reason names, with what brings it here (for the suite's last line)."""
    import re

    if "Orthanc" in reason:
        return "Orthanc (as root: apt-get install orthanc orthanc-dicomweb)"
    built = re.search(r"(validator|fhir-server)/ is not built", reason)
    if built:
        return (f"{built.group(1)}/ (needs java and mvn: apt-get install maven openjdk-17-jdk-headless; "
                "./run_tests.sh then builds it)")
    jar = re.search(r"does not serve (org\.apache\.beam:beam-runners-(\w+)[^ ]*)", reason)
    if jar:
        return (f"{jar.group(2).capitalize()} job server jar {jar.group(1)} (not served by the Maven registry: "
                f"bring it, {_JAR_VARIABLE.get(jar.group(2), 'BEAM_..._JOB_SERVER_JAR')}=/path/to.jar)")
    if "need Java 17" in reason:
        return "Java 17 for Flink and Spark (apt-get install openjdk-17-jdk-headless)"
    if "Go" in reason and ("no Go" in reason or "needs Go" in reason):
        return "Prism (needs Go: apt-get install golang-go)"
    reason = reason.removeprefix("Skipped: ")
    return reason if len(reason) <= 160 else reason[:157] + "..."


def pytest_terminal_summary(terminalreporter, config):
    """One closing line listing every skipped component (counted in tests) and how to get it; written
    at the very end (pytest_unconfigure), after pytest's own summary."""
    from collections import Counter

    counts = Counter()
    for report in terminalreporter.stats.get("skipped", ()):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        counts[skipped_component(reason)] += 1
    if not counts:
        config.stash[_CLOSING_LINE] = "skipped: nothing (every component the tests use is here)"
        return
    parts = [f"{count} x {component}" for component, count in sorted(counts.items(), key=lambda item: -item[1])]
    config.stash[_CLOSING_LINE] = f"skipped {sum(counts.values())} tests: " + "; ".join(parts)


def pytest_unconfigure(config):
    line = config.stash.get(_CLOSING_LINE, None)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None:
        reporter.write_line(line)
