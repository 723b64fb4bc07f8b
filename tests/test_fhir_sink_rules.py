"""The FHIR sink's rules without a server or Beam: when a study's Bundle is sent (stable,
unchanged, refused before), what the server's answers become, credentials (a loopback token
endpoint: renewal before expiry and after a 401, never in a repr or message), and how follow mode
resumes from its newest complete cycle."""
from __future__ import annotations

import os
import time

import pytest
from fhir_auth import Tokens, token_endpoint

from beam_pipeline.run import fhir_sink, follow
from beam_pipeline.run.fhir_sink import SinkEntry, decide
from beam_pipeline.run.layout import STATE_HEADER_NAME, SUMMARY_NAME
from beam_pipeline.sinks.auth import Auth, AuthError, TokenSource
from beam_pipeline.sinks.fhir_server import FhirServerError, Posted, ServerConfig, diagnostics
from beam_pipeline.sources.retry import RetryPolicy

# --- when a Bundle is sent ------------------------------------------------------------------------


def test_a_new_study_waits_until_stable_then_is_sent_once():
    action, kept = decide("1.2", "h1", None, now=100.0, stable_after=30)
    assert action == "deferred" and kept.since == 100.0 and kept.posted is None
    action, kept = decide("1.2", "h1", kept, now=120.0, stable_after=30)
    assert action == "deferred" and kept.since == 100.0  # unchanged, not yet long enough
    action, kept = decide("1.2", "h1", kept, now=130.0, stable_after=30)
    assert action == "post"
    posted = fhir_sink.after_post(kept, "h1", Posted("ok", 200), now=130.0)
    assert posted.posted == "h1"
    assert decide("1.2", "h1", posted, now=999.0, stable_after=30)[0] == "unchanged"


def test_a_late_instance_restarts_the_window_and_sends_a_new_version():
    sent = SinkEntry("1.2", "h1", since=0.0, posted="h1")
    action, kept = decide("1.2", "h2", sent, now=500.0, stable_after=30)
    assert action == "deferred" and kept.since == 500.0 and kept.posted == "h1"
    assert decide("1.2", "h2", kept, now=531.0, stable_after=30)[0] == "post"


def test_without_stable_after_everything_new_is_sent_at_once():
    assert decide("1.2", "h1", None, now=5.0, stable_after=0)[0] == "post"


def test_a_refused_bundle_is_sent_again_only_after_an_hour_or_when_it_changes():
    refused = fhir_sink.after_post(SinkEntry("1.2", "h1", 0.0), "h1", Posted("refused", 400, "HTTP 400: no"), now=10.0)
    assert refused.refused == "HTTP 400: no" and refused.tried == 10.0 and refused.posted is None
    action, kept = decide("1.2", "h1", refused, now=20.0, stable_after=0)
    assert action == "refused-before" and kept.refused == "HTTP 400: no"
    assert decide("1.2", "h1", refused, now=10.0 + fhir_sink.RETRY_REFUSED_AFTER, stable_after=0)[0] == "post"
    assert decide("1.2", "h2", refused, now=20.0, stable_after=0)[0] == "post"


def test_an_unavailable_server_leaves_the_study_unsent():
    kept = SinkEntry("1.2", "h1", 0.0, posted="h0")
    after = fhir_sink.after_post(kept, "h1", Posted("unavailable", detail="503"), now=5.0)
    assert after.posted == "h0" and decide("1.2", "h1", after, now=6.0, stable_after=0)[0] == "post"


def test_state_lines_round_trip_and_a_damaged_one_means_send_again():
    entry = SinkEntry("1.2", "h1", 1.5, "h0", "HTTP 400: x", 2.0)
    assert fhir_sink.read_entry_line(fhir_sink.entry_line(entry)) == entry
    assert fhir_sink.read_entry_line('{"uid": "1.2"') is None


def test_the_study_uid_of_a_bundle():
    bundle = {"id": "b", "entry": [{"resource": {"resourceType": "Device"}}, {"resource": {
        "resourceType": "ImagingStudy", "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]}}]}
    assert fhir_sink.study_uid(bundle) == "1.2.3"


def test_the_servers_operation_outcome_text():
    body = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "HAPI-1094: Resource Patient/x not found"},
                                                          {"details": {"text": "second"}}]}
    assert diagnostics(body, 400) == "HAPI-1094: Resource Patient/x not found; second"
    assert diagnostics(None, 422) == "HTTP 422 without an OperationOutcome"
    assert len(diagnostics({"resourceType": "OperationOutcome", "issue": [{"diagnostics": "x" * 5000}]}, 400)) == 500


def test_server_urls_with_credentials_are_refused():
    with pytest.raises(FhirServerError, match="credentials"):
        ServerConfig("https://user:pw@fhir.example/fhir")
    with pytest.raises(FhirServerError):
        ServerConfig("ftp://fhir.example")


# --- credentials ---------------------------------------------------------------------------------


def test_options_give_one_kind_of_credentials(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    assert Auth.from_options(token_file=str(token_file), environ={}).token == "abc"
    assert Auth.from_options(environ={"FHIR_SERVER_TOKEN": "env-token"}).token == "env-token"
    with pytest.raises(AuthError, match="not both"):
        Auth.from_options(token_file=str(token_file), environ={"FHIR_SERVER_TOKEN": "x"})
    with pytest.raises(AuthError, match="secret"):
        Auth.from_options(token_url="http://127.0.0.1:1/token", client_id="c", environ={})
    with pytest.raises(AuthError, match="--fhir-client-id"):
        Auth.from_options(token_url="http://127.0.0.1:1/token", environ={"FHIR_CLIENT_SECRET": "s"})
    auth = Auth.from_options(token_url="http://127.0.0.1:1/token", client_id="c",
                             environ={"FHIR_CLIENT_SECRET": "very-secret"})
    assert "very-secret" not in repr(auth) and "very-secret" not in repr(ServerConfig("http://h/fhir", auth))
    assert "abc" not in repr(Auth.from_options(token_file=str(token_file), environ={}))


def test_client_credentials_renewed_before_expiry_and_after_a_401():
    tokens = Tokens(lifetime=2.0)
    with token_endpoint(tokens) as url:
        source = TokenSource(Auth(token_url=url, client_id=tokens.client_id, client_secret=tokens.secret,
                                  scope="system/*.write"), policy=RetryPolicy(deadline=10))
        first = source.header()
        assert tokens.valid(first) and source.header() == first and tokens.issued == 1
        time.sleep(2.0 - min(60, 2.0 / 5) + 0.05)  # past the renewal point (a fifth of the lifetime before expiry)
        second = source.header()
        assert second != first and tokens.valid(second) and tokens.issued == 2
        assert source.refused(second) and source.header() not in (first, second) and tokens.issued == 3
        bad = TokenSource(Auth(token_url=url, client_id=tokens.client_id, client_secret="wrong"),
                          policy=RetryPolicy(deadline=10))
        with pytest.raises(AuthError) as refused:
            bad.header()
        assert "wrong" not in str(refused.value) and "HTTP 401" in str(refused.value)


def test_a_token_file_is_read_again_when_it_changes(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("one")
    source = TokenSource(Auth.from_options(token_file=str(token_file), environ={}))
    assert source.header() == "Bearer one"
    token_file.write_text("two-longer")
    assert source.header() == "Bearer two-longer"


# --- follow mode resumes from its newest complete cycle ---------------------------------------------


def _cycle(cycles, name, complete):
    folder = cycles / name
    (folder / "_report").mkdir(parents=True)
    (folder / "_state").mkdir()
    if complete:
        (folder / SUMMARY_NAME).write_text("{}")
        (folder / STATE_HEADER_NAME).write_text("{}")
    return folder


def test_follow_resumes_from_the_newest_complete_cycle_and_drops_the_others(tmp_path):
    _cycle(tmp_path, "00000003", True)
    newest = _cycle(tmp_path, "00000004", True)
    _cycle(tmp_path, "00000005", False)  # stopped mid-way: its acknowledgements are lost, harmlessly
    previous, number = follow.resume(str(tmp_path))
    assert previous == str(newest) and number == 6
    assert sorted(os.listdir(tmp_path)) == ["00000004"]
    assert follow.resume(str(tmp_path / "00000004" / "_state")) == (None, 1)


# --- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (["--fhir-token-file", "t"], "--fhir-token-file needs --fhir-server"),
    (["--fhir-server", "http://127.0.0.1:1/fhir", "--fhir-server-requests", "0"], "at least 1"),
    (["--fhir-server", "http://u:p@127.0.0.1:1/fhir"], "credentials"),
    (["--fhir-server", "http://127.0.0.1:1/fhir", "--fhir-client-id", "c"], "need --fhir-token-url"),
    (["--follow", "--since", "x"], "leave out --since"),
    (["--follow", "--poll-interval", "0"], "--poll-interval"),
    (["--fhir-server", "http://127.0.0.1:1/fhir", "--stable-after", "-1"], "--stable-after"),
])
def test_sink_and_follow_options_are_checked_before_any_work(options, message, tmp_path, capsys):
    from beam_pipeline.run import cli

    with pytest.raises(SystemExit) as ended:
        cli.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), *options])
    assert ended.value.code == 2 and message in capsys.readouterr().err


def test_the_sink_implies_bundles_and_follow_a_stable_window(tmp_path, monkeypatch):
    from beam_pipeline.run import cli

    monkeypatch.setenv("FHIR_SERVER_TOKEN", "s3cr3t-9f")
    settings, _ = cli.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                  "--fhir-server", "http://127.0.0.1:1/fhir"])
    assert settings.conversion.bundles and settings.stable_after == 0 and settings.fhir_server.auth.token == "s3cr3t-9f"
    followed, _ = cli.parse_args(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--follow",
                                  "--fhir-server", "http://127.0.0.1:1/fhir"])
    assert isinstance(followed, follow.FollowSettings)
    assert followed.run.stable_after == follow.DEFAULT_STABLE_AFTER
    assert "s3cr3t-9f" not in repr(followed)


def test_without_a_server_each_cycle_leaves_its_changes_as_a_window(tmp_path):
    first = tmp_path / "cycles" / "00000001"
    first.mkdir(parents=True)
    (first / "ImagingStudy-00000-of-00001.ndjson").write_text('{"id": "a"}\n')
    (first / "manifest.json").write_text("{}")
    (first / "_state").mkdir()
    window = follow.keep_window(str(first), str(tmp_path), 1)
    assert sorted(os.listdir(window)) == ["ImagingStudy-00000-of-00001.ndjson", "manifest.json"]
    second = tmp_path / "cycles" / "00000002"
    (second / "_delta").mkdir(parents=True)
    (second / "_delta" / "ImagingStudy-00000-of-00001.ndjson").write_text('{"id": "b"}\n')
    window = follow.keep_window(str(second), str(tmp_path), 2)
    assert (tmp_path / "windows" / "00000002" / "_delta" / "ImagingStudy-00000-of-00001.ndjson").read_text() == '{"id": "b"}\n'
    assert not (second / "_delta").exists()
    third = tmp_path / "cycles" / "00000003"
    (third / "_delta").mkdir(parents=True)
    (third / "_delta" / "deletions.json").write_text('{"resourceType": "Bundle", "type": "transaction"}')
    assert follow.keep_window(str(third), str(tmp_path), 3) is None  # nothing changed: no window
    assert sorted(os.listdir(tmp_path / "windows")) == ["00000001", "00000002"]


# --- a server that is down ------------------------------------------------------------------------

class _Flaky:
    """A loopback server that counts connections and either drops each one unanswered (``down``)
    or answers it with an empty transaction-response Bundle."""

    def __init__(self):
        import socket
        import threading

        self.down, self.connections = True, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/fhir"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        body = b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}'
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                if not self.down:
                    connection.recv(65536)
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nConnection: close\r\n"
                                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_a_server_down_past_the_deadline_costs_one_deadline_then_one_attempt_per_study_until_it_answers():
    from beam_pipeline.sinks.fhir_server import FhirClient

    server = _Flaky()
    try:
        client = FhirClient(ServerConfig(server.url, retry=RetryPolicy(deadline=1.0, initial=0.05, maximum=0.1)))
        first = client.transaction(b"{}")
        assert first.status == "unavailable" and server.connections >= 3  # retried for the whole deadline
        for _ in range(5):  # the server is known to be down: one attempt each, no retry sleeps
            before = server.connections
            later = client.transaction(b"{}")
            assert later.status == "unavailable" and server.connections == before + 1
            assert "one attempt per request until it answers" in later.detail
        server.down = False
        assert client.transaction(b"{}").status == "ok"  # back: the next study goes through
        server.down = True
        before = server.connections
        assert client.transaction(b"{}").status == "unavailable" and server.connections >= before + 3  # a deadline again
    finally:
        server.listener.close()
