"""``--fhir-server`` and ``--follow`` against the real HAPI FHIR JPA server (fhir-server/, started
once for this module on a free loopback port): through the injecting proxy (503, 429, dropped
connections), refused studies, twice in a row (no new versions), an outage past the deadline
(exit 4), bearer tokens and OAuth2 client credentials (a loopback token endpoint and a proxy that
checks the token), and follow mode: stable studies only, a partial file, SIGTERM and restart.

Nothing here waits a fixed time for something to happen: it polls for the condition with a
generous timeout.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from faults import Faults
from fhir_auth import Tokens, auth_proxy, token_endpoint
from fhir_java import ROOT, HapiServer, request
from helpers import engine_or_skip, follow_ledger, poll
from make_archive import make_archive

from benchmarks.latency_proxy import LatencyProxy
from scripts import engines

pytestmark = pytest.mark.slow

BASE_OPTIONS = ("--patients", "--encounters", "--observations", "--quiet",
                "--direct_running_mode", "in_memory", "--direct_num_workers", "1")


@pytest.fixture(scope="module")
def hapi(tmp_path_factory):
    server = HapiServer(tmp_path_factory.mktemp("hapi") / "hapi-server.log")
    if os.environ.get("DEV_HAPI_PORT"):  # a server already running (while developing): not started here
        server.port = int(os.environ["DEV_HAPI_PORT"])
        server.base = f"http://127.0.0.1:{server.port}/fhir"
        yield server
        return
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("sink-archive")
    make_archive(root, studies=8, series=2, instances=2)
    return root


def convert(input_path, output_dir, *options, env=None, timeout=900):
    """(exit code, stdout, stderr, summary or None) of ``python -m beam_pipeline``."""
    command = [sys.executable, "-m", "beam_pipeline", "--input", str(input_path), "--output", str(output_dir),
               *BASE_OPTIONS, *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    summary_path = Path(output_dir) / "_report" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    return done.returncode, done.stdout, done.stderr, summary


def study_ids(output_dir) -> list[str]:
    return sorted(json.loads(line)["id"] for path in Path(output_dir).glob("ImagingStudy-*.ndjson")
                  for line in path.read_text().splitlines() if line.strip())


def ids_of(folders, tmp_path) -> dict:
    """The ImagingStudy id of each study folder (a batch run of it alone)."""
    found = {}
    for folder in folders:
        code, _, err, _ = convert(folder, tmp_path / "ids" / folder.name)
        assert code == 0, err[-2000:]
        (found[folder],) = study_ids(tmp_path / "ids" / folder.name)
    return found


def add_late_instance(study_folder: Path, target: Path) -> None:
    """A new instance of a study (a copy of its first file with another SOPInstanceUID) at ``target``."""
    late = pydicom.dcmread(sorted(study_folder.rglob("*.dcm"))[0])
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID + ".99"
    late.save_as(target)


def history_total(hapi) -> int:
    status, _, body = request("GET", hapi.base + "/_history?_summary=count", headers={"Cache-Control": "no-cache"})
    assert status == 200, body
    return body["total"]


def on_server(hapi, resource_type: str, resource_id: str) -> bool:
    status, _, _ = hapi.read(resource_type, resource_id)
    return status == 200


def error_lines(output_dir) -> list[dict]:
    return [json.loads(line) for path in Path(output_dir).glob("_report/errors-*.jsonl")
            for line in path.read_text().splitlines() if line.strip()]


def everything_written(output_dir) -> str:
    """Every file the run wrote, as one text (to look for secrets)."""
    return "\n".join(p.read_text(errors="replace") for p in Path(output_dir).rglob("*") if p.is_file())


# --- the sink ------------------------------------------------------------------------------------

def test_every_study_through_faults_then_twice_and_since_change_nothing(hapi, archive, tmp_path):
    hapi.expunge_everything()
    faults = Faults(seed=7, p503=0.2, p429=0.15, pdrop=0.1, only="/fhir")
    with LatencyProxy(f"http://127.0.0.1:{hapi.port}", delay_ms=1, fault=faults) as proxy:
        base = proxy.url + "/fhir"
        code, _, err, summary = convert(archive, tmp_path / "one", "--fhir-server", base, "--retry-deadline", "120")
        assert code == 0, err[-2000:]
        assert faults.injected > 0  # the faults happened and were ridden out
        ids = study_ids(tmp_path / "one")
        assert len(ids) == 8 and summary["fhir_server"]["studies_written"] == 8
        assert summary["resources"]["Bundle"] == 8 and "errors_by_reason" in summary
        assert all(on_server(hapi, "ImagingStudy", i) for i in ids)
        versions = history_total(hapi)
        # the same run again (no --since): every Bundle sent again, nothing new on the server
        code, _, err, again = convert(archive, tmp_path / "two", "--fhir-server", base, "--retry-deadline", "120")
        assert code == 0, err[-2000:]
        assert again["fhir_server"]["studies_written"] == 8
        assert history_total(hapi) == versions
        assert all(hapi.read("ImagingStudy", i)[2]["meta"]["versionId"] == "1" for i in ids)
        # --since: the server has every Bundle already; nothing is sent
        proxy.counts.reset()
        code, _, err, since = convert(archive, tmp_path / "three", "--since", tmp_path / "two", "--fhir-server", base)
        assert code == 0, err[-2000:]
        assert since["fhir_server"] == {"studies_unchanged": 8}
        assert proxy.counts.snapshot()["by_method"].get("POST", 0) == 0


def test_since_sends_the_changed_study_and_deletes_the_gone_one(hapi, archive, tmp_path):
    hapi.expunge_everything()
    source = tmp_path / "in"
    shutil.copytree(archive, source)
    base = hapi.base
    code, _, err, _ = convert(source, tmp_path / "n1", "--fhir-server", base)
    assert code == 0, err[-2000:]
    before = study_ids(tmp_path / "n1")
    studies = sorted(p for p in source.glob("*/*") if p.is_dir())
    shutil.rmtree(studies[0])
    code, _, err, summary = convert(source, tmp_path / "n2", "--since", tmp_path / "n1", "--fhir-server", base)
    assert code == 0, err[-2000:]
    gone = sorted(set(before) - set(study_ids(tmp_path / "n2")))
    assert len(gone) == 1 and summary["fhir_server"]["deletions_sent"] >= 1
    assert summary["fhir_server"]["studies_unchanged"] == 7
    assert hapi.read("ImagingStudy", gone[0])[0] == 410  # deleted
    assert all(on_server(hapi, "ImagingStudy", i) for i in study_ids(tmp_path / "n2"))


def test_a_refused_study_is_one_error_line_with_the_servers_text(hapi, archive, tmp_path):
    """Without --patients, HAPI refuses every study (its subject does not exist: HAPI-1094)."""
    hapi.expunge_everything()
    out = tmp_path / "bare"
    command_options = [o for o in BASE_OPTIONS if o != "--patients"]
    command = [sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out),
               *command_options, "--fhir-server", hapi.base]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]  # refusals are the data's, not a fault: exit 0
    summary = json.loads((out / "_report" / "summary.json").read_text())
    assert summary["errors_by_reason"] == {"fhir-server-refused": 8}
    assert summary["fhir_server"]["studies_refused"] == 8
    refused = [e for e in error_lines(out) if e["reason"] == "fhir-server-refused"]
    assert len({e["study_uid"] for e in refused}) == 8
    assert all(e["study_uid"].replace(".", "").isdigit() for e in refused)
    assert all("HAPI-1094" in e["detail"] and e["detail"].startswith("HTTP 400") for e in refused)
    assert len(study_ids(out)) == 8  # the files are written all the same
    assert hapi.count("ImagingStudy") == 0


def test_an_outage_past_the_deadline_makes_studies_unavailable_and_exit_4(hapi, archive, tmp_path):
    hapi.expunge_everything()

    def no_transactions(method, target):
        return 503 if method == "POST" else None

    with LatencyProxy(f"http://127.0.0.1:{hapi.port}", delay_ms=0, fault=no_transactions) as proxy:
        code, _, err, summary = convert(archive, tmp_path / "out", "--fhir-server", proxy.url + "/fhir",
                                        "--retry-deadline", "2")
    assert code == 4, err[-2000:]
    assert summary["errors_by_reason"] == {"unavailable": 8}
    assert summary["fhir_server"]["studies_unavailable"] == 8
    assert all("503" in e["detail"] for e in error_lines(tmp_path / "out"))
    # the next --since run sends them (the state says the server does not have them)
    code, _, err, again = convert(archive, tmp_path / "again", "--since", tmp_path / "out", "--fhir-server", hapi.base)
    assert code == 0, err[-2000:]
    assert again["fhir_server"]["studies_written"] == 8


# --- credentials -------------------------------------------------------------------------------

def test_oauth2_client_credentials_renewed_and_never_shown(hapi, archive, tmp_path):
    hapi.expunge_everything()
    tokens = Tokens(lifetime=3600)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(tokens.secret + "\n")
    with token_endpoint(tokens) as token_url, auth_proxy(f"http://127.0.0.1:{hapi.port}", tokens) as proxy:
        options = ("--fhir-server", proxy + "/fhir", "--fhir-token-url", token_url, "--fhir-client-id",
                   tokens.client_id, "--fhir-client-secret-file", str(secret_file), "--fhir-scope", "system/*.write")
        code, out, err, summary = convert(archive, tmp_path / "out", *options)
        assert code == 0, err[-2000:]
        assert summary["fhir_server"]["studies_written"] == 8 and tokens.issued >= 1
        for secret in (tokens.secret, *tokens.live):
            assert secret not in out + err + everything_written(tmp_path / "out")
        # a wrong secret: one line before any work, exit 2, the secret not in it
        secret_file.write_text("wrong-secret")
        code, out, err, _ = convert(archive, tmp_path / "refused", *options)
        assert code == 2 and "token endpoint" in err and "wrong-secret" not in out + err


def test_bearer_token_from_the_environment_and_a_refused_one(hapi, archive, tmp_path):
    hapi.expunge_everything()
    tokens = Tokens()
    tokens.add_static("static-token-123")
    with auth_proxy(f"http://127.0.0.1:{hapi.port}", tokens) as proxy:
        code, out, err, summary = convert(archive, tmp_path / "ok", "--fhir-server", proxy + "/fhir",
                                          env={"FHIR_SERVER_TOKEN": "static-token-123"})
        assert code == 0, err[-2000:]
        assert summary["fhir_server"]["studies_written"] == 8
        assert "static-token-123" not in out + err + everything_written(tmp_path / "ok")
        code, out, err, _ = convert(archive, tmp_path / "bad", "--fhir-server", proxy + "/fhir",
                                    env={"FHIR_SERVER_TOKEN": "not-a-token"})
        assert code == 2 and "credentials" in err and "not-a-token" not in out + err


# --- follow mode ---------------------------------------------------------------------------------

def prism_options(mode: str) -> list[str]:
    """Follow mode on Prism (``--follow-mode cycles`` or ``stream``); a skip without it (a failure in CI)."""
    prism = engine_or_skip(engines.install_prism, required_in_ci=True)
    return ["--runner", "PrismRunner", "--prism_location", str(prism), "--follow-mode", mode]


def follow_status(out: Path) -> dict:
    try:
        return json.loads((out / "follow.json").read_text())
    except (OSError, ValueError):
        return {}


def start_follow(watched, out, base, *options, log):
    command = [sys.executable, "-m", "beam_pipeline", "--follow", "--input", str(watched), "--output", str(out),
               *BASE_OPTIONS, "--fhir-server", base, "--stable-after", "2", "--poll-interval", "0.5", *options]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def ended(process, timeout=300) -> int:
    return process.wait(timeout=timeout)


@pytest.mark.parametrize("runner", ["in_process", "prism"])
def test_follow_cycles_stable_studies_partial_file_sigterm_and_restart(hapi, archive, tmp_path, runner):
    extra = prism_options("cycles") if runner == "prism" else []
    hapi.expunge_everything()
    studies = sorted(p for p in archive.glob("*/*") if p.is_dir())
    watched, out = tmp_path / "watched", tmp_path / "follow"
    watched.mkdir()
    id_of = ids_of(studies[:4], tmp_path)
    for folder in studies[:2]:
        shutil.copytree(folder, watched / folder.name)
    log = open(tmp_path / "follow.log", "wb")
    process = start_follow(watched, out, hapi.base, *extra, log=log)
    try:
        poll(lambda: all(on_server(hapi, "ImagingStudy", id_of[f]) for f in studies[:2]), what="the first studies")
        first = follow_status(out)
        # a partial file of a new study (its header cut off) must not become a study
        whole = sorted(studies[2].rglob("*.dcm"))[0].read_bytes()
        partial = watched / studies[2].name / "000001.dcm"
        partial.parent.mkdir()
        partial.write_bytes(whole[:200])
        seen = first["cycle"]
        poll(lambda: follow_status(out).get("cycle", 0) >= seen + 3, what="three more cycles")
        assert not on_server(hapi, "ImagingStudy", id_of[studies[2]])
        process.send_signal(signal.SIGTERM)
        assert ended(process) == 0
        # restart: the partial file completed meanwhile, and another study arrived
        partial.write_bytes(whole)
        shutil.copytree(studies[3], watched / studies[3].name)
        process = start_follow(watched, out, hapi.base, *extra, log=log)
        poll(lambda: on_server(hapi, "ImagingStudy", id_of[studies[3]]), what="the study copied while stopped")
        poll(lambda: on_server(hapi, "ImagingStudy", id_of[studies[2]]), what="the completed partial study")
        # a late instance of a study already sent: a new version of it, with one instance more
        sent = hapi.read("ImagingStudy", id_of[studies[0]])[2]
        add_late_instance(watched / studies[0].name, watched / studies[0].name / "late.dcm")
        updated = poll(lambda: (lambda body: body if body["meta"]["versionId"] == "2" else None)(
            hapi.read("ImagingStudy", id_of[studies[0]])[2]), what="the late instance's new version")
        assert updated["numberOfInstances"] == sent["numberOfInstances"] + 1
        process.send_signal(signal.SIGTERM)
        assert ended(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    text = (tmp_path / "follow.log").read_text(errors="replace")
    assert "studies_deferred" in text  # a new study waits for --stable-after
    # the first studies were not sent again as new versions after the restart
    assert hapi.read("ImagingStudy", id_of[studies[1]])[2]["meta"]["versionId"] == "1"
    assert len(list((out / "cycles").iterdir())) == 1  # only the newest cycle is kept




def version(hapi, study_id: str) -> str | None:
    status, _, body = hapi.read("ImagingStudy", study_id)
    return body["meta"]["versionId"] if status == 200 else None


def test_follow_stream_on_prism_late_instance_partial_file_sigterm_drain_and_restart(hapi, archive, tmp_path):
    """The streaming pipeline (a session window per study): studies reach the server once stable,
    a late instance makes a new version, a partial file is no study until complete, SIGTERM drains
    (what was listed is written, nothing half), and a restart sends what arrived meanwhile without
    sending the others again."""
    extra = prism_options("stream")
    hapi.expunge_everything()
    studies = sorted(p for p in archive.glob("*/*") if p.is_dir())
    watched, out = tmp_path / "watched", tmp_path / "follow"
    watched.mkdir()
    id_of = ids_of(studies[:5], tmp_path)
    for folder in studies[:2]:
        shutil.copytree(folder, watched / folder.name)
    log = open(tmp_path / "follow.log", "wb")
    process = start_follow(watched, out, hapi.base, *extra, log=log)
    try:
        poll(lambda: all(version(hapi, id_of[f]) for f in studies[:2]), what="the first studies")
        # a partial file of a new study (its header cut off) must not become a study
        whole = sorted(studies[2].rglob("*.dcm"))[0].read_bytes()
        partial = watched / studies[2].name / "000001.dcm"
        partial.parent.mkdir()
        partial.write_bytes(whole[:200])
        poll(lambda: any(w["counts"].get("error:truncated") for w in follow_ledger(out)), what="the partial file's window")
        assert version(hapi, id_of[studies[2]]) is None
        # a late instance of a study already sent: a new version of it, with one instance more
        sent = hapi.read("ImagingStudy", id_of[studies[0]])[2]
        add_late_instance(watched / studies[0].name, watched / studies[0].name / "late.dcm")
        updated = poll(lambda: (lambda body: body if body["meta"]["versionId"] == "2" else None)(
            hapi.read("ImagingStudy", id_of[studies[0]])[2]), what="the late instance's new version")
        assert updated["numberOfInstances"] == sent["numberOfInstances"] + 1
        # SIGTERM right after a study arrived: it is written now, or left for the next start
        shutil.copytree(studies[3], tmp_path / "staging" / studies[3].name)
        (tmp_path / "staging" / studies[3].name).rename(watched / studies[3].name)  # whole, as receivers do
        process.send_signal(signal.SIGTERM)
        assert ended(process) == 0
        assert not [p for p in (out / "windows").iterdir() if p.name.startswith(".")]  # nothing half-written
        assert not list(out.glob("state/*/*/*.tmp"))
        # restart: the partial file completed meanwhile, and another study arrived
        partial.write_bytes(whole)
        shutil.copytree(studies[4], watched / studies[4].name)
        process = start_follow(watched, out, hapi.base, *extra, log=log)
        for folder in studies[2:5]:
            poll(lambda: version(hapi, id_of[folder]), what=f"{folder.name} after the restart")
        process.send_signal(signal.SIGTERM)
        assert ended(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    # nothing sent twice: the studies sent before a restart keep their version
    assert version(hapi, id_of[studies[1]]) == "1"
    assert version(hapi, id_of[studies[0]]) == "2"
    for folder in studies[2:5]:
        assert version(hapi, id_of[folder]) == "1"
    (completed,) = [hapi.read("ImagingStudy", id_of[studies[2]])[2]]
    assert completed["numberOfInstances"] == 1  # the one file, complete now
    counts = Counter()
    for summary in follow_ledger(out):
        counts.update(summary["counts"])
    assert counts["fhir_server:studies_written"] == 6  # five studies, one of them twice (the late instance)
    assert not counts["fhir_server:studies_unavailable"]


class Switch:
    """A fault for the injecting proxy: every request answered 503 while ``down``."""

    def __init__(self, down: bool):
        self.down = down

    def __call__(self, method, target):
        return 503 if self.down else None


def test_follow_stream_server_down_at_start_and_mid_run_with_expiring_tokens(hapi, archive, tmp_path):
    """The server down when follow mode starts (a warning, not an end), down again mid-run (the
    study is counted unavailable and sent once the server is back), and OAuth2 tokens that
    expire while it runs (renewed; never in any output)."""
    extra = prism_options("stream")
    hapi.expunge_everything()
    studies = sorted(p for p in archive.glob("*/*") if p.is_dir())[:3]
    id_of = ids_of(studies, tmp_path)
    watched, staging, out = tmp_path / "watched", tmp_path / "staging", tmp_path / "follow"
    watched.mkdir()
    staging.mkdir()

    def arrive(folder):
        shutil.copytree(folder, staging / folder.name)
        (staging / folder.name).rename(watched / folder.name)

    def unavailable() -> int:
        return sum(w["counts"].get("fhir_server:studies_unavailable", 0) for w in follow_ledger(out))

    tokens = Tokens(lifetime=4)
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(tokens.secret + "\n")
    switch = Switch(down=True)
    log = open(tmp_path / "follow.log", "wb")
    process = None
    with LatencyProxy(f"http://127.0.0.1:{hapi.port}", delay_ms=0, fault=switch) as faulty, \
            token_endpoint(tokens) as token_url, auth_proxy(faulty.url, tokens) as proxy:
        try:
            process = start_follow(watched, out, proxy + "/fhir", *extra, "--retry-deadline", "2",
                                   "--fhir-token-url", token_url, "--fhir-client-id", tokens.client_id,
                                   "--fhir-client-secret-file", str(secret_file), log=log)
            arrive(studies[0])
            poll(lambda: unavailable() >= 1, what="the study counted unavailable while the server is down")
            assert process.poll() is None  # down at start: not an end
            switch.down = False
            poll(lambda: version(hapi, id_of[studies[0]]), what="the study once the server is back")
            with tokens.lock:
                first_tokens = dict(tokens.live)
            poll(lambda: max(first_tokens.values()) < time.time(), what="the tokens issued so far to expire")
            arrive(studies[1])
            poll(lambda: version(hapi, id_of[studies[1]]), what="a study sent after its token expired")
            switch.down = True  # down mid-run
            before = unavailable()
            arrive(studies[2])
            poll(lambda: unavailable() > before, what="the study counted unavailable mid-run")
            switch.down = False
            poll(lambda: version(hapi, id_of[studies[2]]), what="the study once the server is back again")
            process.send_signal(signal.SIGTERM)
            assert ended(process) == 0
        finally:
            if process is not None and process.poll() is None:
                process.kill()
            log.close()
    assert tokens.issued >= 2  # renewed
    for folder in studies:
        assert version(hapi, id_of[folder]) == "1"
    shown = (tmp_path / "follow.log").read_text(errors="replace") + everything_written(out)
    for secret in (tokens.secret, *tokens.live):
        assert secret not in shown


@pytest.mark.parametrize("mode", ["cycles", "stream"])
def test_follow_a_pacs_over_dicomweb(hapi, archive, tmp_path, mode):
    """QIDO-RS polled (every cycle, or by the streaming pipeline's watcher on Prism): a study stored
    in the PACS reaches the server, so does one stored later; the first is not sent again."""
    import orthanc as orthanc_harness

    extra = prism_options("stream") if mode == "stream" else []

    binary, plugin = orthanc_harness.find_binary(), orthanc_harness.find_plugin()
    if binary is None or plugin is None:
        if os.environ.get("CI"):
            pytest.fail("Orthanc with its DICOMweb plugin is not installed")
        pytest.skip("Orthanc with its DICOMweb plugin is not installed")
    hapi.expunge_everything()
    studies = sorted(p for p in archive.glob("*/*") if p.is_dir())[:2]
    id_of = ids_of(studies, tmp_path)
    pacs = orthanc_harness.Orthanc(str(tmp_path / "orthanc"), binary, plugin).start()
    log = open(tmp_path / "follow.log", "wb")
    process = None
    try:
        pacs.upload_all(sorted(str(p) for p in studies[0].rglob("*.dcm")))
        command = [sys.executable, "-m", "beam_pipeline", "--follow", "--dicomweb", pacs.dicomweb_url,
                   "--output", str(tmp_path / "follow"), *BASE_OPTIONS, "--fhir-server", hapi.base,
                   "--stable-after", "1", "--poll-interval", "0.5", *extra]
        env = {**os.environ, "DICOMWEB_USER": orthanc_harness.USER, "DICOMWEB_PASSWORD": orthanc_harness.PASSWORD}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        poll(lambda: on_server(hapi, "ImagingStudy", id_of[studies[0]]), what="the study in the PACS")
        pacs.upload_all(sorted(str(p) for p in studies[1].rglob("*.dcm")))
        poll(lambda: on_server(hapi, "ImagingStudy", id_of[studies[1]]), what="the study stored later")
        process.send_signal(signal.SIGTERM)
        assert ended(process) == 0
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        log.close()
        pacs.stop()
    assert hapi.read("ImagingStudy", id_of[studies[0]])[2]["meta"]["versionId"] == "1"
