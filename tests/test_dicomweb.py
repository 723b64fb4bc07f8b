"""The DICOMweb source against a real Orthanc: the same records and lines as from the files on disk,
filters, paging, a study gone between listing and fetching, unreachable server, refused credentials."""
from __future__ import annotations

import dataclasses
import glob
import http.server
import json
import os
import threading
import time
import warnings
from collections import Counter

import apache_beam as beam
import orthanc as orthanc_harness
import pydicom.data
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from faults import Faults
from helpers import raw_lines, read_ndjson
from make_archive import make_archive

from benchmarks.latency_proxy import LatencyProxy
from beam_pipeline.codes import DOSE_REPORT_KEY, Reason, sha256_id
from beam_pipeline.dicom import header
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.fhir.keywords import header_spec
from beam_pipeline.run import cli, transforms
from beam_pipeline.run.pipeline import execute
from beam_pipeline.run.state import StateError
from beam_pipeline.sources import dicomweb
from beam_pipeline.sources.retry import RetryPolicy

DATA = os.path.dirname(pydicom.data.__file__)
# Files whose two readings differ for a reason outside this source, each checked in its own test:
DISK_READER_DIFFERS = "ExplVR_BigEndNoMeta.dcm"  # bare big-endian dataset: the file reader says not DICOM
SERVER_LOSES = ("J2K_pixelrep_mismatch.dcm", "PixelSpacing")  # Orthanc decodes its "\" as JIS X 0201 yen


def pydicom_files() -> list[str]:
    """All files pydicom ships for tests, character set examples included, in a fixed order."""
    files = [p for folder in ("test_files", "charset_files")
             for p in glob.glob(os.path.join(DATA, folder, "**"), recursive=True) if os.path.isfile(p)]
    return sorted(f for f in files if os.path.basename(f) not in (DISK_READER_DIFFERS, SERVER_LOSES[0]))


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    binary, plugin = orthanc_harness.find_binary(), orthanc_harness.find_plugin()
    if binary is None or plugin is None:
        message = ("Orthanc with its DICOMweb plugin is not installed (Debian packages orthanc, "
                   "orthanc-dicomweb; .ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = orthanc_harness.Orthanc(str(tmp_path_factory.mktemp("orthanc")), binary, plugin).start()
    server.loaded = None
    yield server
    server.stop()


def load(server, name: str, paths) -> list[str]:
    """Makes the archive hold exactly these files (cached by name); returns the files stored."""
    if server.loaded != name:
        server.clear()
        server.stored = server.upload_all(paths)
        server.loaded = name
    return server.stored


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Several patients and studies (CT, MR, CR; mixed modalities in one study)."""
    root = tmp_path_factory.mktemp("generated")
    manifest = make_archive(root, studies=5, series=2, instances=3, patients=3)
    return sorted(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True)), manifest


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.delenv(dicomweb.TOKEN_ENV, raising=False)
    monkeypatch.setenv(dicomweb.USER_ENV, orthanc_harness.USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, orthanc_harness.PASSWORD)


def connection(server, **options) -> dicomweb.Connection:
    creds = dicomweb.Credentials(user=orthanc_harness.USER, password=orthanc_harness.PASSWORD)
    return dicomweb.Connection(server.dicomweb_url, creds, **options)


def disk_record(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as handle:
            return header.read_header(handle, header_spec())


def web_records(conn: dicomweb.Connection, query=dicomweb.StudyQuery()) -> dict:
    """(SOPInstanceUID, SeriesInstanceUID) -> HeaderResult for every instance on the server."""
    client, spec, results = conn.client(), header_spec(), {}
    for uid in dicomweb.list_studies(conn, query, client):
        fetched = dicomweb.fetch_study(client, uid)
        assert fetched.error is None, fetched.error
        for dataset in fetched.instances:
            result = dicomweb.read_instance(dataset, spec)
            results[result.record["SOPInstanceUID"], result.record["SeriesInstanceUID"]] = result
    return results


def run_dicomweb(url: str, output_dir, *options: str) -> dict:
    settings, beam_args = cli.parse_args(["--dicomweb", url, "--output", str(output_dir), *options])
    return execute(lambda: BeamTestPipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args),
                                            blocking=False), settings)


def run_files(paths, output_dir, *options: str) -> dict:
    """The file path over exactly these files (linked into one folder)."""
    folder = output_dir.parent / (output_dir.name + "-input")
    for index, path in enumerate(paths):
        os.makedirs(folder, exist_ok=True)
        os.symlink(path, folder / f"{index:05d}-{os.path.basename(path)}")
    settings, beam_args = cli.parse_args(["--input", str(folder), "--output", str(output_dir), *options])
    return execute(lambda: BeamTestPipeline(runner=FnApiRunner(), options=PipelineOptions(beam_args),
                                            blocking=False), settings)


# ---------------------------------------------------------------------------------------------
# Same records, same lines


def test_records_from_orthanc_equal_records_from_files(orthanc, generated):
    stored = load(orthanc, "all", pydicom_files() + generated[0])
    web = web_records(connection(orthanc))
    compared = 0
    for path in stored:
        disk = disk_record(path)
        assert disk.kind == header.INSTANCE, path
        key = disk.record["SOPInstanceUID"], disk.record["SeriesInstanceUID"]
        # (notes say how the file was read, e.g. reader-fallback:big-endian: not part of the record)
        assert web[key] == dataclasses.replace(disk, notes=()), os.path.basename(path)
        compared += 1
    assert compared == len(web)  # every instance on the server came from one of these files
    assert compared >= 150  # pydicom's files Orthanc accepts (about 120) + 30 generated
    charset_files = [p for p in stored if "charset_files" in p]
    assert len(charset_files) >= 12  # Latin, Greek, Cyrillic, Arabic, Hebrew, Japanese, Korean, Chinese


def test_same_imagingstudy_and_device_lines_as_from_disk(orthanc, generated, credentials, tmp_path):
    stored = load(orthanc, "all", pydicom_files() + generated[0])
    # the server's base is the web run's meta.source and Endpoint address; named for the files
    from_disk = run_files(stored, tmp_path / "disk", "--wado-rs-base", orthanc.dicomweb_url,
                          "--meta-source", orthanc.dicomweb_url)
    from_web = run_dicomweb(orthanc.dicomweb_url, tmp_path / "web")
    for name in ("ImagingStudy", "Device", "Endpoint"):
        assert raw_lines(tmp_path / "web", name) == raw_lines(tmp_path / "disk", name), name
    assert len(raw_lines(tmp_path / "web", "Endpoint")) == 1
    assert from_web["studies"] == from_disk["studies"]
    assert from_web["studies"]["written"] >= 35
    assert from_web["outcomes"] == from_disk["outcomes"]
    assert from_web["files_matched"] == len(stored) == sum(from_web["outcomes"].values())
    listed = from_web["dicomweb"]["studies_listed"]
    assert listed == from_web["dicomweb"]["studies_fetched"] == len(orthanc.study_ids())
    assert "studies_failed" not in from_web["dicomweb"]
    assert sum(from_web["studies"].values()) == listed


def test_dose_reports_from_orthanc_equal_dose_reports_from_files(orthanc, credentials, tmp_path):
    """WADO-RS metadata carries a dose report's content tree: same DoseReport, same Observations."""
    import dose_reports

    paths = [dose_reports.write(dose_reports.ct_report(), tmp_path / "ct.dcm"),
             dose_reports.write(dose_reports.projection_report(), tmp_path / "xa.dcm")]
    stored = load(orthanc, "dose", paths)
    assert sorted(stored) == sorted(paths)
    web = web_records(connection(orthanc))
    for path in paths:
        disk = disk_record(path)
        assert disk.record[DOSE_REPORT_KEY].items  # values were read
        assert web[disk.record["SOPInstanceUID"], disk.record["SeriesInstanceUID"]] == disk
    run_files(stored, tmp_path / "disk", "--wado-rs-base", orthanc.dicomweb_url,  # the web run's endpoint
              "--meta-source", orthanc.dicomweb_url)                            # and meta.source
    run_dicomweb(orthanc.dicomweb_url, tmp_path / "web")
    assert len(raw_lines(tmp_path / "web", "Observation")) == 4  # 2 summaries, 2 CT irradiation events
    for name in ("ImagingStudy", "Observation"):
        assert raw_lines(tmp_path / "web", name) == raw_lines(tmp_path / "disk", name), name


def test_orthanc_quirks_stay_visible(orthanc):
    """The two files left out above: what differs, and only that."""
    loose = [os.path.join(DATA, "test_files", DISK_READER_DIFFERS), os.path.join(DATA, "test_files", SERVER_LOSES[0])]
    load(orthanc, "quirks", loose)
    web = {key[0]: result for key, result in web_records(connection(orthanc)).items()}
    assert disk_record(loose[0]).kind == header.NOT_DICOM
    assert len(web) == 2
    disk = disk_record(loose[1])
    from_web = web[disk.record["SOPInstanceUID"]]
    lost = SERVER_LOSES[1]
    assert lost in disk.record and lost not in from_web.record
    assert from_web.record == {k: v for k, v in disk.record.items() if k != lost}
    assert from_web.record["ImageType"] == disk.record["ImageType"]  # yen signs turned back into "\"


# ---------------------------------------------------------------------------------------------
# Listing: filters and paging


@pytest.fixture(scope="module")
def ten_studies(tmp_path_factory):
    """Ten one-instance studies on consecutive days 2021-01-04.., modalities CT, MR, CR in turn."""
    root = tmp_path_factory.mktemp("ten")
    manifest = make_archive(root, studies=10, series=1, instances=1, patients=4)
    return sorted(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True)), manifest["study_uids"]


def listed(server, **query) -> list[str]:
    return list(dicomweb.list_studies(connection(server, page_size=3), dicomweb.StudyQuery(**query)))


def test_paging_lists_every_study_once(orthanc, ten_studies):
    paths, uids = ten_studies
    load(orthanc, "ten", paths)
    assert sorted(listed(orthanc)) == sorted(uids)  # pages of 3, 3, 3, 1, then an empty page


def test_filters(orthanc, ten_studies):
    paths, uids = ten_studies
    load(orthanc, "ten", paths)
    assert sorted(listed(orthanc, date_from="20210106", date_to="20210108")) == sorted(uids[2:5])
    assert sorted(listed(orthanc, date_from="20210112")) == sorted(uids[8:])
    assert sorted(listed(orthanc, date_to="20210104")) == [uids[0]]
    assert sorted(listed(orthanc, modality="MR")) == sorted(uids[1::3])
    assert sorted(listed(orthanc, study_uids=(uids[7], uids[2], uids[7]))) == sorted([uids[2], uids[7]])
    assert listed(orthanc, modality="CT", study_uids=(uids[1],)) == []  # study 1 is MR
    assert sorted(listed(orthanc, modality="CT", date_from="20210105", date_to="20210110")) == sorted(uids[3:7:3])


def test_pipeline_with_filters_and_small_pages(orthanc, ten_studies, credentials, tmp_path):
    paths, uids = ten_studies
    load(orthanc, "ten", paths)
    summary = run_dicomweb(orthanc.dicomweb_url, tmp_path, "--modality", "CT", "--dicomweb-page-size", "3")
    assert summary["dicomweb"] == {"studies_fetched": 4, "studies_listed": 4}
    assert summary["studies"]["written"] == 4
    assert summary["files_matched"] == summary["outcomes"]["converted"] == 4
    studies = read_ndjson(tmp_path, "ImagingStudy")
    system = ConversionConfig().study_id_system
    assert sorted(s["id"] for s in studies) == sorted(sha256_id(system, uid) for uid in uids[0::3])


def test_bad_filters_are_refused_before_any_request(capsys):
    for options in (["--study-date-from", "2021-01-01"], ["--study-uid", "1.2.abc"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args(["--dicomweb", "http://127.0.0.1:9/dicom-web", "--output", "/tmp/x", *options])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["--input", "/tmp", "--output", "/tmp/x", "--modality", "CT"])
    assert "needs --dicomweb" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Failures: one study, or the whole server


def test_study_deleted_between_listing_and_fetching_is_an_error_line(orthanc, ten_studies, tmp_path):
    paths, uids = ten_studies
    load(orthanc, "ten", paths)
    conn = connection(orthanc)
    listed_uids = sorted(dicomweb.list_studies(conn, dicomweb.StudyQuery()))
    gone = uids[4]
    orthanc.delete_study(gone)
    orthanc.loaded = None  # the archive changed
    source = dicomweb.Source(conn)
    with BeamTestPipeline(runner=FnApiRunner(), options=PipelineOptions([])) as pipeline:
        fetched = (pipeline
                   | beam.Create([[(uid, None) for uid in listed_uids]])
                   | beam.ParDo(transforms.FetchStudiesDoFn(source)).with_outputs(
                       transforms.ERRORS, transforms.COUNTS, transforms.STATE, main="partials"))
        assert_that(fetched[transforms.ERRORS], equal_to([{
            "reason": "study-not-found", "study_uid": gone, "status": 404,
            "detail": "the study was listed but is no longer on the server"}]), label="error")
        keys = fetched.partials | beam.Keys()
        assert_that(keys, equal_to(sorted(set(uids) - {gone})), label="others")
        assert_that(fetched[transforms.COUNTS] | beam.CombineGlobally(transforms.SumCounts()),
                    equal_to([{"dicomweb:studies_fetched": 9, "dicomweb:studies_failed": 1,
                               "error:study-not-found": 1, "files_matched": 9, "instances_read": 9}]),
                    label="counts")


class _Always503(http.server.BaseHTTPRequestHandler):
    """A server in trouble: every request is answered 503 (and counted)."""

    requests_seen = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests_seen += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_server_errors_are_retried_with_backoff_then_unavailable():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/dicom-web"
        conn = dicomweb.Connection(url, retry=RetryPolicy(deadline=1.5, initial=0.05, maximum=0.1))
        started = time.monotonic()
        fetched = dicomweb.fetch_study(conn.client(), "1.2.3")
        assert time.monotonic() - started >= 1.2  # retried until close to the deadline
        assert fetched.error == {"reason": Reason.UNAVAILABLE, "study_uid": "1.2.3", "status": None,
                                 "detail": f"{url} answered HTTP 503, still after 1.5 s of retries"}
        assert _Always503.requests_seen >= 3
    finally:
        server.shutdown()
        server.server_close()


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "instances_per_second")}


@pytest.mark.parametrize("faults", [
    Faults(p503=0.2, p429=0.1),                                  # QIDO, WADO and the start-up check
    Faults(outage=(0.0, 4.0, 1000.0), pdrop=0.1, only="/metadata"),  # a PACS restart while fetching
    Faults(outage=(0.0, 3.0, 1000.0)),                           # ... during the start-up check
], ids=["random-503-429", "outage-and-drops-while-fetching", "outage-at-start-up"])
def test_pacs_faults_cost_time_not_a_study(faults, orthanc, ten_studies, credentials, tmp_path):
    """Through an injecting proxy in front of Orthanc (one port for every run, so that the URL in
    Endpoint and meta.source is the same): the same lines and counts as a fault-free run."""
    paths, _ = ten_studies
    load(orthanc, "ten", paths)
    port = orthanc_harness.free_port()

    def run(name, fault):
        with LatencyProxy(orthanc.url, delay_ms=0, port=port, upstream_slots=8, fault=fault) as proxy:
            return run_dicomweb(proxy.url + "/dicom-web", tmp_path / name, "--retry-deadline", "30",
                                "--dicomweb-page-size", "3")

    clean = run("clean", None)
    faulty = run("faulty", faults)
    assert faults.injected > 0
    assert _without_timing(faulty) == _without_timing(clean)
    assert clean["dicomweb"] == {"studies_fetched": 10, "studies_listed": 10}
    for name in ("ImagingStudy", "Device", "Endpoint", "errors"):
        assert raw_lines(tmp_path / "faulty", name) == raw_lines(tmp_path / "clean", name), name


def test_unreachable_server_fails_fast_with_one_line(tmp_path, capsys, credentials):
    url = f"http://127.0.0.1:{orthanc_harness.free_port()}/dicom-web"
    started = time.monotonic()
    code = cli.main(["--dicomweb", url, "--output", str(tmp_path / "out")])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: cannot reach DICOMweb server {url}: connection refused"
    assert elapsed < 60  # refused at once, not retried for the 180 s deadline
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("env", [
    {dicomweb.TOKEN_ENV: "wrong-token-123"},
    {dicomweb.USER_ENV: orthanc_harness.USER, dicomweb.PASSWORD_ENV: "wrong-password-456"},
    {},
], ids=["wrong-token", "wrong-password", "no-credentials"])
def test_refused_credentials_fail_with_one_clear_line(orthanc, tmp_path, capsys, monkeypatch, env):
    for name in (dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["--dicomweb", orthanc.dicomweb_url, "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: DICOMweb server {orthanc.dicomweb_url} answered HTTP 401 Unauthorized")
    assert "\n" not in err
    for secret in env.values():
        if secret != orthanc_harness.USER:
            assert secret not in err


def test_credentials_only_from_the_environment(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--dicomweb", "http://user:secret@127.0.0.1:9/dicom-web", "--output", "/tmp/x"])
    err = capsys.readouterr().err
    assert "not in the URL" in err and "secret" not in err
    monkeypatch.setenv(dicomweb.TOKEN_ENV, "token-789")
    monkeypatch.delenv(dicomweb.USER_ENV, raising=False)
    monkeypatch.delenv(dicomweb.PASSWORD_ENV, raising=False)
    settings, _ = cli.parse_args(["--dicomweb", "http://127.0.0.1:9/dicom-web", "--output", "/tmp/x"])
    assert settings.dicomweb.connection.credentials.token == "token-789"
    assert "token-789" not in repr(settings)
    assert settings.dicomweb.connection.verify is True  # TLS verification on by default


def test_a_url_that_is_not_the_dicomweb_root_fails_with_one_line(orthanc, tmp_path, capsys, credentials):
    code = cli.main(["--dicomweb", orthanc.url, "--output", str(tmp_path)])  # Orthanc's own REST API
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"error: DICOMweb server {orthanc.url} answered HTTP 400 to a study search: "
                   "is this the DICOMweb root?")


def test_a_study_on_a_server_gone_away_is_an_error_line_not_a_crash():
    """A PACS down (restarting) for longer than the deadline: the study is unavailable, to be read
    by the next run."""
    url = f"http://127.0.0.1:{orthanc_harness.free_port()}/dicom-web"
    conn = dicomweb.Connection(url, retry=RetryPolicy(deadline=0.3, initial=0.01, maximum=0.05))
    fetched = dicomweb.fetch_study(conn.client(), "1.2.3")
    assert fetched.instances is None
    assert fetched.error == {"reason": Reason.UNAVAILABLE, "study_uid": "1.2.3", "status": None,
                             "detail": f"no answer from {url} (ConnectionError), still after 0.3 s of retries"}


def test_a_server_that_never_answers_fails_the_check_in_one_line(tmp_path, capsys, credentials, monkeypatch):
    """Accepts the connection, never replies: the start-up check gives up after its own short
    timeout without retries (the fetches on the workers keep their long timeout and retries)."""
    import socket

    monkeypatch.setattr(dicomweb, "CHECK_TIMEOUT", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        started = time.monotonic()
        code = cli.main(["--dicomweb", url, "--output", str(tmp_path / "out")])
        elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert elapsed < 10


# ---------------------------------------------------------------------------------------------
# Must-support elements through DICOMweb: issuers, accession issuer, endpoint, meta.source


@pytest.fixture(scope="module")
def issuers(tmp_path_factory):
    """Four studies of one PatientID from different issuers (see issuer_archive), and the table."""
    from issuer_archive import SYSTEMS, make_issuer_archive

    root = tmp_path_factory.mktemp("issuers")
    manifest = make_issuer_archive(root)
    table = tmp_path_factory.mktemp("issuer-table") / "issuers.json"
    table.write_text(json.dumps(SYSTEMS))
    return sorted(glob.glob(os.path.join(root, "**", "*.dcm"), recursive=True)), manifest["study_uids"], table


def test_issuer_sequences_come_through_dicomweb_as_from_files(orthanc, issuers):
    paths, _, _ = issuers
    stored = load(orthanc, "issuers", paths)
    assert len(stored) == len(paths) == 8
    web = web_records(connection(orthanc))
    seen = Counter()
    for path in stored:
        disk = disk_record(path)
        key = disk.record["SOPInstanceUID"], disk.record["SeriesInstanceUID"]
        assert web[key] == dataclasses.replace(disk, notes=())
        seen.update(k for k in ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
                                "IssuerOfAccessionNumberSequence") if k in disk.record)
    assert seen == {"IssuerOfPatientID": 4, "IssuerOfPatientIDQualifiersSequence": 2,
                    "IssuerOfAccessionNumberSequence": 4}
    item = next(r for r in web.values() if "IssuerOfPatientIDQualifiersSequence" in r.record).record
    assert item["IssuerOfPatientIDQualifiersSequence"] == ({"UniversalEntityID": "1.2.276.0.76.4.2",
                                                            "UniversalEntityIDType": "ISO"},)


def test_dicomweb_run_writes_endpoint_source_and_issuer_systems(orthanc, issuers, credentials, tmp_path):
    from issuer_archive import ACCESSION_OID, SYSTEMS

    paths, uids, table = issuers
    stored = load(orthanc, "issuers", paths)
    options = ("--patient-id-issuers", str(table), "--unknown-patient-id-issuer", "default", "--service-requests")
    summary = run_dicomweb(orthanc.dicomweb_url + "/", tmp_path / "web", *options)
    assert summary["studies"] == {"written": 4, "rejected": 0}
    [endpoint] = read_ndjson(tmp_path / "web", "Endpoint")  # automatic with --dicomweb
    assert endpoint["address"] == orthanc.dicomweb_url and endpoint["connectionType"]["code"] == "dicom-wado-rs"
    studies = {s["identifier"][-1]["value"][len("urn:oid:"):]: s for s in read_ndjson(tmp_path / "web", "ImagingStudy")}
    assert {s["meta"]["source"] for s in studies.values()} == {orthanc.dicomweb_url}
    assert all(s["endpoint"] == [{"reference": "Endpoint/" + endpoint["id"]}] for s in studies.values())
    systems = [studies[uid]["subject"]["identifier"]["system"] for uid in uids]
    assert [systems[0], systems[1], systems[3]] == [SYSTEMS["HOSP_A"], SYSTEMS["HOSP_B"], SYSTEMS["1.2.276.0.76.4.2"]]
    assert len({studies[uid]["subject"]["reference"] for uid in uids}) == 4  # one PatientID, four people
    assert studies[uids[0]]["basedOn"][0]["identifier"]["system"] == "urn:oid:" + ACCESSION_OID
    assert summary["resources"]["ServiceRequest"] == 4
    assert "unmapped:IssuerOfPatientID" not in summary["notes"]  # every issuer given is in the table
    # the same files read from disk, with the server named as endpoint and source: the same lines
    run_files(stored, tmp_path / "disk", *options, "--wado-rs-base", orthanc.dicomweb_url,
              "--meta-source", orthanc.dicomweb_url)
    for name in ("ImagingStudy", "Endpoint", "ServiceRequest"):
        assert raw_lines(tmp_path / "web", name) == raw_lines(tmp_path / "disk", name), name


def test_dicomweb_rejects_unknown_issuers_by_default(orthanc, issuers, credentials, tmp_path):
    paths, uids, _ = issuers
    load(orthanc, "issuers", paths)
    summary = run_dicomweb(orthanc.dicomweb_url, tmp_path / "web")
    assert summary["studies"] == {"written": 1, "rejected": 3}
    assert summary["errors_by_reason"] == {Reason.UNKNOWN_PATIENT_ID_ISSUER: 3}
    assert {e["study_uid"] for e in read_ndjson(tmp_path / "web", "errors")} == {uids[0], uids[1], uids[3]}


# ---------------------------------------------------------------------------------------------
# Nightly runs (--since): fetch only the studies whose listing changed


def test_a_study_stamp_follows_its_counts_and_study_attributes():
    listed = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00201206": {"vr": "IS", "Value": [2]},
              "00201208": {"vr": "IS", "Value": [7]}, "00080050": {"vr": "SH", "Value": ["ACC1"]}}
    stamp = dicomweb.study_stamp(listed)
    assert stamp.startswith("2:7:")
    assert "ACC1" not in stamp  # a digest, not the values
    more = {**listed, "00201208": {"vr": "IS", "Value": [8]}}
    corrected = {**listed, "00080050": {"vr": "SH", "Value": ["ACC2"]}}
    assert len({stamp, dicomweb.study_stamp(more), dicomweb.study_stamp(corrected)}) == 3
    assert dicomweb.study_stamp({**listed, "00201206": {"vr": "IS"}}) is None  # no counts: always fetched
    assert dicomweb.study_stamp({**listed, "00201208": {"vr": "IS", "Value": ["x"]}}) is None


def late_series(path: str, folder) -> list[str]:
    """Two new instances in a new series of the study of ``path``."""
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".77"
    made = []
    for number in (1, 2):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SeriesInstanceUID + f".{number}"
        ds.InstanceNumber = number
        target = os.path.join(folder, f"late-{number}.dcm")
        ds.save_as(target, enforce_file_format=False)
        made.append(target)
    return made


def test_a_nightly_run_fetches_only_changed_studies_and_gives_the_full_runs_snapshot(orthanc, credentials, tmp_path):
    from nightly_changes import assert_same_snapshot, deletions, delta_keys, study_key

    made = make_archive(tmp_path / "night1", studies=4, series=2, instances=2, patients=2)
    first_files = sorted(glob.glob(str(tmp_path / "night1" / "**" / "*.dcm"), recursive=True))
    orthanc.clear()
    orthanc.loaded = None  # this test changes the archive
    assert len(orthanc.upload_all(first_files)) == len(first_files)
    url = orthanc.dicomweb_url
    run_dicomweb(url, tmp_path / "a", "--quiet")

    extended, deleted = made["study_uids"][0], made["study_uids"][3]
    in_extended = next(p for p in first_files if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == extended)
    os.makedirs(tmp_path / "late")
    assert orthanc.upload_all(late_series(in_extended, tmp_path / "late"))
    new = make_archive(tmp_path / "night2", studies=1, series=1, instances=3, seed=7)
    assert orthanc.upload_all(sorted(glob.glob(str(tmp_path / "night2" / "**" / "*.dcm"), recursive=True)))
    orthanc.delete_study(deleted)

    nightly = run_dicomweb(url, tmp_path / "b", "--quiet", "--since", str(tmp_path / "a"))
    full = run_dicomweb(url, tmp_path / "c", "--quiet")
    assert_same_snapshot(tmp_path / "b", tmp_path / "c")
    assert nightly["incremental"] == {
        "studies_fetched": 2, "studies_new": 1, "studies_changed_or_retried": 1, "studies_not_fetched": 2,
        "studies_gone": 1, "studies_rebuilt": 2, "studies_reused": 2, "studies_deleted": 1}
    assert full["dicomweb"]["studies_fetched"] == nightly["dicomweb"]["studies_fetched"] == 4
    assert delta_keys(tmp_path / "b", "ImagingStudy") == sorted(study_key(uid) for uid in (extended, *new["study_uids"]))
    assert study_key(deleted) in deletions(tmp_path / "b")

    again = run_dicomweb(url, tmp_path / "d", "--quiet", "--since", str(tmp_path / "c"))
    assert again["incremental"] == {"studies_not_fetched": 4, "studies_reused": 4}
    assert_same_snapshot(tmp_path / "d", tmp_path / "c")
    assert deletions(tmp_path / "d") == []


def test_a_nightly_run_refuses_the_state_of_another_query_or_of_files(orthanc, credentials, generated, tmp_path, capsys):
    load(orthanc, "generated", generated[0])
    run_dicomweb(orthanc.dicomweb_url, tmp_path / "a", "--quiet", "--modality", "CT")
    for options in (["--modality", "MR"], []):
        with pytest.raises(StateError, match="its state is of another input"):
            run_dicomweb(orthanc.dicomweb_url, tmp_path / "b", "--quiet", "--since", str(tmp_path / "a"), *options)
    with pytest.raises(StateError, match="its state is of another input"):
        run_files(generated[0][:2], tmp_path / "f", "--quiet", "--since", str(tmp_path / "a"))
