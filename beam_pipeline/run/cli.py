"""Command line: options parsed once into ``Settings``, checked before any work, then one run."""
from __future__ import annotations

import argparse
import glob as globlib
import json
import logging
import math
import os
import re
import sys
import threading
import uuid
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    SetupOptions,
    TypeOptions,
    _BeamArgumentParser,
)

from beam_pipeline.codes import EXIT_INCOMPLETE, TRANSIENT_REASONS
from beam_pipeline.dicom.header_io import MAX_HEADER_BYTES, READ_COST
from beam_pipeline.fhir.bulk_data import request_line
from beam_pipeline.fhir.config import ConversionConfig
from beam_pipeline.run import follow, output, progress, stream
from beam_pipeline.run.layout import SUMMARY_NAME
from beam_pipeline.run.pipeline import execute, in_process, local_runner
from beam_pipeline.run.settings import DEFAULT_READ_CONCURRENCY, JOB_SERVER_TIMEOUT, Settings
from beam_pipeline.run.state import StateError
from beam_pipeline.run.summary import accounted, describe
from beam_pipeline.sinks.auth import CLIENT_SECRET_ENV, TOKEN_ENV as FHIR_TOKEN_ENV, Auth, AuthError
from beam_pipeline.sinks.fhir_server import DEFAULT_REQUESTS, FhirClient, FhirServerError, ServerConfig
from beam_pipeline.sources import gcs
from beam_pipeline.sources.dicomweb import (
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    Connection,
    Credentials,
    DicomWebError,
    Source,
    StudyQuery,
    safe_url,
)

_LOG = logging.getLogger(__name__)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line (and exit 2), not the page of usage argparse prints first."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class _OneLineBeamParser(_BeamArgumentParser):
    def error(self, message):
        self.exit(2, f"error: Beam option: {message} (see --help)\n")


def argument_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m beam_pipeline", allow_abbrev=False,
        description="Convert a DICOM archive into FHIR R4 ImagingStudy/Device NDJSON for bulk import.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="directory (recursive), glob, or gs:// path/glob")
    source.add_argument("--dicomweb", metavar="URL",
                        help="DICOMweb root of a PACS (e.g. http://pacs:8042/dicom-web) to read instead of "
                             f"--input; credentials only from {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}")
    parser.add_argument("--output", required=True, help="output directory (local or gs://)")
    parser.add_argument("--since", metavar="PREVIOUS_OUTPUT",
                        help="the output folder of an earlier run over the same input: read only new and changed "
                             "files (with --dicomweb: fetch only studies whose series or instance counts or "
                             "study attributes changed), rebuild only changed studies, and write what changed "
                             "to OUTPUT/_delta/")
    parser.add_argument("--group-by", choices=("study", "directory"), default="study",
                        help="study: one study across any folders (default); directory: each first-level "
                             "folder under --input is one study, folders with several studies are rejected")
    defaults = ConversionConfig()
    parser.add_argument("--study-id-system", default=defaults.study_id_system)
    parser.add_argument("--patient-id-system", default=defaults.patient_id_system)
    parser.add_argument("--accession-id-system", default=defaults.accession_id_system,
                        help="system of the ACSN identifier (and basedOn) where IssuerOfAccessionNumberSequence "
                             "names no global issuer (default: none, as the legacy converter)")
    parser.add_argument("--patient-id-issuers", metavar="FILE",
                        help="JSON object issuer -> system: IssuerOfPatientID (or the UniversalEntityID of its "
                             "qualifiers) to the PatientID's identifier system; \"\" maps studies without issuer")
    parser.add_argument("--unknown-patient-id-issuer", choices=("reject", "default"),
                        default=defaults.unknown_patient_id_issuer,
                        help="a PatientID whose issuer is given but not in --patient-id-issuers: reject its study "
                             "(unknown-patient-id-issuer, default) or give it --patient-id-system")
    parser.add_argument("--wado-rs-base", metavar="URL",
                        help="DICOMweb (WADO-RS) service base where the studies can be retrieved: every study "
                             "references one Endpoint with this address (default with --dicomweb: its URL)")
    parser.add_argument("--meta-source", metavar="URI",
                        help="ImagingStudy.meta.source (default: the --dicomweb URL, or the --input root as a "
                             "file:// or gs:// URI)")
    parser.add_argument("--encounter-id-system", default=defaults.encounter_id_system,
                        help="system of Encounter identifiers built from AdmissionID")
    parser.add_argument("--patient-id-length", type=int, default=None,
                        help="keep only the first N characters of PatientID (default: whole)")
    parser.add_argument("--timezone", default=defaults.timezone,
                        help="zone of DICOM dates without TimezoneOffsetFromUTC (default Europe/Berlin)")
    parser.add_argument("--no-instances", action="store_true", help="leave out the instance level")
    parser.add_argument("--no-devices", action="store_true", help="write no Device resources")
    parser.add_argument("--observations", action="store_true",
                        help="write body weight/height Observations and reference them")
    parser.add_argument("--no-dose-reports", action="store_true",
                        help="write no Observations from X-Ray Radiation Dose SRs (written by default)")
    parser.add_argument("--patients", action="store_true",
                        help="write a minimal Patient (id, MR identifier) for every subject reference")
    parser.add_argument("--encounters", action="store_true",
                        help="write a minimal Encounter (id, VN identifier, subject) for every encounter reference")
    parser.add_argument("--service-requests", action="store_true",
                        help="write a minimal ServiceRequest (id, ACSN identifier, subject) for every basedOn "
                             "and make basedOn a literal reference to it")
    parser.add_argument("--bundles", action="store_true",
                        help="also write one FHIR transaction Bundle per study (PUT by id) to OUT/bundles/")
    parser.add_argument("--manifest-base-url", default=None,
                        help="absolute base URL of the file URLs in manifest.json (default: relative to the "
                             "output folder), e.g. the bucket's https URL")
    parser.add_argument("--validate", choices=("sampled", "full", "none"), default="sampled",
                        help="fhir.resources R4B validation of every study: sampled (default) validates each "
                             "resource with one instance per distinct instance shape and checks every "
                             "instance uid; full validates every instance (slow for large studies); none")
    parser.add_argument("--pydicom-only", action="store_true",
                        help="read every header with pydicom instead of the fast scanner")
    parser.add_argument("--max-header-mib", type=int, default=MAX_HEADER_BYTES // (1024 * 1024), metavar="MIB",
                        help="reading one header may cost at most this many MiB (each read or element "
                             f"counts {READ_COST} bytes extra); more is an error header-too-large "
                             "(default %(default)s)")
    parser.add_argument("--read-concurrency", type=int, default=DEFAULT_READ_CONCURRENCY, metavar="N",
                        help=f"header reads in flight per worker process on gs:// (default {DEFAULT_READ_CONCURRENCY}; 1 reads one after "
                             "the other); local files are read one after the other")
    parser.add_argument("--retry-deadline", type=float, default=gcs.DEFAULT_RETRY_DEADLINE, metavar="SECONDS",
                        help="seconds one gs:// or DICOMweb request (read, listing page, access check, QIDO "
                             "search, WADO metadata) retries transient answers (408, 429, 5xx, dropped "
                             "connections) before its file or study is an error `unavailable` "
                             f"(default {gcs.DEFAULT_RETRY_DEADLINE:g})")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--progress-interval", type=float, default=progress.DEFAULT_INTERVAL, metavar="SECONDS",
                        help=f"seconds between progress lines (default {progress.DEFAULT_INTERVAL:g})")
    web = parser.add_argument_group("DICOMweb source (with --dicomweb)")
    web.add_argument("--study-date-from", metavar="YYYYMMDD", help="only studies on or after this StudyDate")
    web.add_argument("--study-date-to", metavar="YYYYMMDD", help="only studies on or before this StudyDate")
    web.add_argument("--modality", help="only studies with this modality (QIDO ModalitiesInStudy)")
    web.add_argument("--study-uid", action="append", default=[], metavar="UID",
                     help="only this StudyInstanceUID (repeatable)")
    connection = Connection("http://localhost")
    web.add_argument("--dicomweb-page-size", type=int, default=connection.page_size,
                     help=f"studies per QIDO-RS search request (default {connection.page_size})")
    web.add_argument("--dicomweb-requests", type=int, default=connection.max_in_flight,
                     help=f"metadata requests in flight per worker process (default {connection.max_in_flight})")
    web.add_argument("--dicomweb-timeout", type=float, default=connection.read_timeout,
                     help=f"seconds to wait for one response (default {connection.read_timeout:g})")
    web.add_argument("--dicomweb-ca-bundle", metavar="PATH",
                     help="CA certificates to verify the server's TLS certificate (default: the system's)")
    sink = parser.add_argument_group("FHIR server (--fhir-server)")
    sink.add_argument("--fhir-server", metavar="URL",
                      help="also write every study to this FHIR server (R4 base URL) as one transaction Bundle "
                           "of PUTs by id (implies --bundles); with --since, only what the server does not have "
                           "yet, and DELETEs for what is gone")
    sink.add_argument("--fhir-server-requests", type=int, default=DEFAULT_REQUESTS, metavar="N",
                      help=f"transactions in flight per worker process (default {DEFAULT_REQUESTS}; fewer when "
                           "the server answers 429/503)")
    sink.add_argument("--fhir-token-file", metavar="PATH",
                      help=f"a bearer token for the server, read again when the file changes (or set {FHIR_TOKEN_ENV})")
    sink.add_argument("--fhir-token-url", metavar="URL",
                      help="OAuth2 token endpoint: fetch access tokens with client credentials (SMART Backend "
                           "Services style), renewed before they expire")
    sink.add_argument("--fhir-client-id", metavar="ID", help="the OAuth2 client id (with --fhir-token-url)")
    sink.add_argument("--fhir-client-secret-file", metavar="PATH",
                      help=f"the OAuth2 client's secret (with --fhir-token-url; or set {CLIENT_SECRET_ENV})")
    sink.add_argument("--fhir-scope", metavar="SCOPES", help="the scopes to ask for (with --fhir-token-url)")
    live = parser.add_argument_group("Follow mode (--follow)")
    live.add_argument("--follow", action="store_true",
                      help="keep running: convert what is new or changed in the input every --poll-interval "
                           "seconds; stops on SIGTERM or SIGINT once what is in progress is written")
    live.add_argument("--follow-mode", choices=follow.MODES, default="auto",
                      help="stream: one streaming pipeline (session windows per study; needs a streaming "
                           "runner sharing the local --output: Prism, Flink); cycles: a loop of bounded --since "
                           "runs into OUTPUT/cycles/ (any runner, DICOMweb); auto (default): stream on a "
                           "streaming runner with files, else cycles")
    live.add_argument("--stable-after", type=float, default=None, metavar="SECONDS",
                      help=f"write a study (to --fhir-server, or a window) only once no new instance of it came "
                           f"for this long (default "
                           f"{follow.DEFAULT_STABLE_AFTER:g} with --follow, else 0)")
    live.add_argument("--poll-interval", type=float, default=follow.DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                      help=f"how often --follow lists the input (stream), or the seconds between the starts of "
                           f"two cycles (default {follow.DEFAULT_POLL_INTERVAL:g})")
    return parser


def fhir_server(args, parser) -> ServerConfig | None:
    """The sink of --fhir-server and its credentials (from files or the environment)."""
    given = [name for name in ("fhir_token_file", "fhir_token_url", "fhir_client_id", "fhir_client_secret_file",
                               "fhir_scope") if getattr(args, name)]
    if args.fhir_server is None:
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --fhir-server")
        if args.stable_after and not args.follow:
            parser.error("--stable-after needs --fhir-server or --follow")
        return None
    if args.fhir_server_requests < 1:
        parser.error("--fhir-server-requests must be at least 1")
    try:
        auth = Auth.from_options(args.fhir_token_file, args.fhir_token_url, args.fhir_client_id,
                                 args.fhir_client_secret_file, args.fhir_scope)
        return ServerConfig(args.fhir_server, auth, gcs.RetryPolicy(deadline=args.retry_deadline),
                            args.fhir_server_requests)
    except (AuthError, FhirServerError) as exc:
        parser.error(str(exc))


_WEB_ONLY = ("study_date_from", "study_date_to", "modality", "study_uid", "dicomweb_ca_bundle")


_ABSOLUTE_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


def patient_id_issuers(path: str | None, parser) -> tuple[tuple[str, str], ...]:
    """The --patient-id-issuers table: a JSON object of issuer strings to absolute URIs."""
    if path is None:
        return ()
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, ValueError) as exc:
        parser.error(f"--patient-id-issuers {path}: {type(exc).__name__}: cannot be read as JSON")
    if not isinstance(table, dict):
        parser.error(f"--patient-id-issuers {path}: must be a JSON object issuer -> system")
    for issuer, system in table.items():
        if not isinstance(system, str) or not _ABSOLUTE_URI.match(system):
            parser.error(f"--patient-id-issuers {path}: the system of issuer {issuer!r} is not an absolute URI")
    return tuple(sorted((issuer.strip(), system) for issuer, system in table.items()))


def wado_rs_base(args, parser) -> str | None:
    """The Endpoint's address: --wado-rs-base, else the --dicomweb URL; without both none."""
    if args.wado_rs_base is None:
        return safe_url(args.dicomweb).rstrip("/") if args.dicomweb else None
    parts = urlsplit(args.wado_rs_base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error("--wado-rs-base must be an http(s) URL of a DICOMweb service base")
    if parts.username or parts.password or parts.query or parts.fragment:
        parser.error("--wado-rs-base must not carry credentials, a query or a fragment (studies are "
                     "retrieved below it)")
    return args.wado_rs_base.rstrip("/")


def meta_source(args, parser) -> str | None:
    """meta.source: --meta-source, the --dicomweb URL, or None (the pipeline takes the input root)."""
    if args.meta_source is not None:
        if not _ABSOLUTE_URI.match(args.meta_source):
            parser.error("--meta-source must be an absolute URI")
        return args.meta_source
    return safe_url(args.dicomweb).rstrip("/") if args.dicomweb else None


def dicomweb_source(args, parser) -> Source | None:
    """The DICOMweb source of --dicomweb and its filters; credentials from the environment."""
    if args.dicomweb is None:
        given = [name for name in _WEB_ONLY if getattr(args, name)]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --dicomweb")
        return None
    if args.group_by != "study":
        parser.error("--group-by directory needs files (--input); a DICOMweb source is read per study")
    for name in ("dicomweb_page_size", "dicomweb_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not positive(args.dicomweb_timeout):
        parser.error("--dicomweb-timeout must be a positive number of seconds")
    if args.dicomweb_ca_bundle and not os.path.isfile(args.dicomweb_ca_bundle):
        parser.error(f"--dicomweb-ca-bundle {args.dicomweb_ca_bundle} is not a file")
    try:
        connection = Connection(args.dicomweb.rstrip("/"), Credentials.from_env(),
                                read_timeout=args.dicomweb_timeout, page_size=args.dicomweb_page_size,
                                retry=gcs.RetryPolicy(deadline=args.retry_deadline),
                                max_in_flight=args.dicomweb_requests, verify=args.dicomweb_ca_bundle or True)
        query = StudyQuery(args.study_date_from, args.study_date_to, args.modality, tuple(args.study_uid))
    except DicomWebError as exc:
        parser.error(str(exc))
    return Source(connection, query)


MIN_PROGRESS_INTERVAL = 0.05


def positive(value: float) -> bool:
    """A finite number above 0 (``nan`` fails every comparison, so it must be ruled out itself)."""
    return math.isfinite(value) and value > 0


def same_folder(input_path: str, output_path: str) -> bool:
    if "://" in input_path or "://" in output_path:
        return input_path.rstrip("/") == output_path.rstrip("/")
    return os.path.realpath(input_path) == os.path.realpath(output_path)


def unknown_beam_options(beam_args: list[str]) -> list[str]:
    """Options that neither we nor any Beam PipelineOptions class know (Beam itself only warns)."""
    parser = _OneLineBeamParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # as PipelineOptions.get_all_options does
    _, unknown = parser.parse_known_args(beam_args)
    return [arg for arg in unknown if arg.startswith("-")]


def dask_requested(beam_args: list[str]) -> bool:
    """``--runner dask`` or a ``--dask_*`` option: the Dask runner's options are then known (its
    module imports dask, which a run on another runner need not load)."""
    runner = next((value for flag, value in zip(beam_args, beam_args[1:]) if flag == "--runner"), None)
    runner = runner or next((arg.split("=", 1)[1] for arg in beam_args if arg.startswith("--runner=")), None)
    return any(arg.startswith("--dask_") for arg in beam_args) or (runner or "").lower() in ("dask", "daskrunner")


def parse_args(argv=None) -> tuple[Settings, list[str]]:
    """Our options -> Settings; the rest must be Beam options. Errors exit 2 with one line."""
    parser = argument_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, beam_args = parser.parse_known_args(argv)
    if dask_requested(beam_args):
        import beam_pipeline.run.dask_runner  # noqa: F401 - registers the --dask_* options
    unknown = unknown_beam_options(beam_args)
    if unknown:
        parser.error(f"unknown option(s): {' '.join(unknown)} (neither this tool's nor Beam's; see --help)")
    if not positive(args.retry_deadline):
        parser.error("--retry-deadline must be a positive number of seconds")
    web_source = dicomweb_source(args, parser)
    if args.input is not None and "://" in args.input and not args.input.startswith("gs://"):
        parser.error(f"--input {args.input.split('://', 1)[0]}:// is not supported: give a local path or gs://")
    if args.input is not None and "://" not in args.input and not os.path.lexists(args.input) \
            and not globlib.has_magic(args.input):
        parser.error(f"--input {args.input} does not exist")
    if args.read_concurrency < 1:
        parser.error("--read-concurrency must be at least 1")
    if not positive(args.progress_interval) or args.progress_interval < MIN_PROGRESS_INTERVAL:
        parser.error(f"--progress-interval must be a number of seconds, at least {MIN_PROGRESS_INTERVAL}")
    if args.patient_id_length is not None and args.patient_id_length < 1:
        parser.error("--patient-id-length must be at least 1")
    if args.manifest_base_url is not None and not re.match(r"^[a-z][a-z0-9+.-]*://\S+$", args.manifest_base_url):
        parser.error("--manifest-base-url must be an absolute URL such as https://storage.googleapis.com/BUCKET/out")
    if args.manifest_base_url is not None:
        base = urlsplit(args.manifest_base_url)
        if base.username or base.password or base.query or base.fragment:
            parser.error("--manifest-base-url must not carry credentials, a query or a fragment "
                         "(the manifest's file URLs are built under it; sign them separately)")
    if args.since is not None and same_folder(args.since, args.output):
        parser.error("--since must name the previous run's output folder, not --output: write each run to a new folder")
    if args.input is not None and same_folder(args.input, args.output):
        parser.error("--output must not be the --input folder itself: put it beside or inside it")
    try:
        ZoneInfo(args.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        parser.error(f"--timezone {args.timezone!r} is not a known time zone")
    if args.max_header_mib < 1:
        parser.error("--max-header-mib must be at least 1")
    conversion = ConversionConfig(
        study_id_system=args.study_id_system, patient_id_system=args.patient_id_system,
        accession_id_system=args.accession_id_system, encounter_id_system=args.encounter_id_system,
        patient_id_length=args.patient_id_length, timezone=args.timezone,
        include_instances=not args.no_instances, include_devices=not args.no_devices,
        observations=args.observations, dose_reports=not args.no_dose_reports, patients=args.patients,
        encounters=args.encounters, bundles=args.bundles or args.fhir_server is not None,
        service_requests=args.service_requests, source=meta_source(args, parser),
        wado_rs_base=wado_rs_base(args, parser), patient_id_issuers=patient_id_issuers(args.patient_id_issuers, parser),
        unknown_patient_id_issuer=args.unknown_patient_id_issuer)
    sink = fhir_server(args, parser)
    stable_after = args.stable_after if args.stable_after is not None else (
        follow.DEFAULT_STABLE_AFTER if args.follow else 0.0)
    if stable_after < 0 or not math.isfinite(stable_after):
        parser.error("--stable-after must be a number of seconds, 0 or more")
    if args.follow:
        if args.since is not None:
            parser.error("--follow keeps its own state under OUTPUT: leave out --since")
        if not positive(args.poll_interval):
            parser.error("--poll-interval must be a positive number of seconds")
    run_id = uuid.uuid4().hex[:12]
    settings = Settings(input=args.input, output=args.output, group_by=args.group_by, run_id=run_id,
                        use_fast_reader=not args.pydicom_only, validate=args.validate, conversion=conversion,
                        max_header_bytes=args.max_header_mib * 1024 * 1024,
                        read_concurrency=args.read_concurrency, retry_deadline=args.retry_deadline,
                        progress=None if args.quiet else progress.new_settings(args.output, run_id, args.progress_interval),
                        dicomweb=web_source, request=request_line(argv),
                        manifest_base_url=args.manifest_base_url, since=args.since,
                        fhir_server=sink, stable_after=stable_after)
    if args.follow:
        mode = follow.mode_of(args.follow_mode, settings, beam_args, parser.error)
        settings = follow.FollowSettings(settings, args.poll_interval, mode)
    return settings, beam_args


def run(argv=None) -> dict:
    """Parse options once, run the pipeline, print the summary."""
    settings, beam_args = parse_args(argv)
    if isinstance(settings, follow.FollowSettings):
        if settings.mode == "stream":
            return stream.run(settings.run, settings.poll_interval, beam_args)
        return follow.follow(settings, lambda: new_pipeline(beam_args))
    # permanent problems in seconds; transient answers (an outage at start-up) retried up to the deadline
    gcs.check_access(settings.input, settings.output, policy=gcs.RetryPolicy(deadline=settings.retry_deadline),
                     since_path=settings.since)
    if settings.fhir_server is not None:  # refused credentials, not a FHIR server: one line, no pipeline
        FhirClient(settings.fhir_server).check()
    if dask_requested(beam_args):  # a named Dask cluster that cannot be reached: one line, output untouched
        from beam_pipeline.run.dask_runner import check_scheduler

        check_scheduler(PipelineOptions(beam_args))
    try:
        summary = execute(lambda: new_pipeline(beam_args), settings)
    except Exception as exc:
        if output.disk_full(exc):
            raise output.OutputFull(f"no space left on the device of --output {settings.output} ({first_line(exc)}): "
                                    f"the output is incomplete, no {SUMMARY_NAME} was written") from exc
        raise
    print(describe(summary), flush=True)
    return summary


def new_pipeline(beam_args: list[str]) -> beam.Pipeline:
    """The Pipeline for the named runner. On the in-process runner, Beam's type inference at
    construction is skipped (0.1 s of a 1.1 s start-up; what it checks is the pipeline's code, which
    the tests also run on Prism and Dask, where it stays on)."""
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    if not any(arg.split("=", 1)[0] in ("--job_server_timeout", "--job-server-timeout") for arg in beam_args):
        options.view_as(PortableOptions).job_server_timeout = JOB_SERVER_TIMEOUT  # see settings
    runner = local_runner(options)
    if in_process(runner):
        options.view_as(TypeOptions).pipeline_type_check = False
    return beam.Pipeline(runner=runner, options=options)


# Where a Go stack trace starts in a Prism job's error (a panic in a stage or in the pipeline, with
# ``debug.Stack()`` appended): what comes after it is frames, not the problem.
_GO_STACK = re.compile(r",?\s*(stackTrace|Stacktrace):|^goroutine \d+ \[", re.MULTILINE)


def first_line(exc: BaseException, job_error: str | None = None) -> str:
    """The innermost cause's type and the last line of its message (Beam wraps worker errors many
    times; the last line names the problem), a Go stack trace cut off first. An error raised
    ``from None`` is its own cause. A broken stream of the job service (a gRPC error: the job
    server stopped before it reported the job's end) names nothing: then the ``job_error`` the
    runner logged before it (``JobErrors``) is the cause, else the stream's status (its deadline:
    the job server said nothing of the job's end within ``--job_server_timeout``)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):  # grpc.RpcError
        if job_error:
            return f"the job failed: {_last_line(job_error)}"
        code = exc.code()
        if getattr(code, "name", None) == "DEADLINE_EXCEEDED":
            return "the job server did not report the job's end within --job_server_timeout"
        return f"{type(exc).__name__}: {getattr(code, 'name', code)}: {_last_line(str(exc.details() or ''))}"
    return f"{type(exc).__name__}: {_last_line(str(exc))}"


def _last_line(message: str) -> str:
    stack = _GO_STACK.search(message)
    text = (message[:stack.start()] if stack else message).strip().splitlines()
    return text[-1].strip()[:300] if text else ""


class JobErrors(logging.Filter):
    """The console's filter (``not_repeated_below``) that also keeps the last job error Beam's
    portable runner logged, for ``first_line``."""

    def __init__(self):
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.module == "portable_runner":
            self.last = record.getMessage()
        return not_repeated_below(record)

    def after_last_messages(self) -> str | None:
        """The last job error once Beam's message reader has read the job's last messages (as Beam
        itself waits for them when the job ends; at most a few seconds)."""
        for thread in threading.enumerate():
            if thread.name == _BEAM_MESSAGE_READER:
                thread.join(5)
        return self.last


def not_repeated_below(record: logging.LogRecord) -> bool:
    """Keeps off the console what the one error line repeats: Prism's own log (its start and stop,
    each failed bundle again, a Go stack) and the job's error, which Beam's portable runner logs
    and then raises."""
    if record.name == "PrismRunner":
        return False
    return not (record.levelno >= logging.ERROR and record.module == "portable_runner")


# Beam's portable runner reads the job's messages in a thread of this name; when the job server
# stops first (a failed Prism job), its message stream raises there, and Python prints that thread's
# traceback on the console while the main thread raises the job's failure (printed in one line).
_BEAM_MESSAGE_READER = "wait_until_finish_read"


def quiet_message_reader(default_hook):
    """A ``threading.excepthook``: the failure of Beam's message reader goes to the debug log in one
    line; every other thread's uncaught exception to ``default_hook`` as before."""
    def hook(args):
        if args.thread is not None and args.thread.name == _BEAM_MESSAGE_READER:
            _LOG.debug("Beam's job message reader stopped: %s", first_line(args.exc_value))
            return
        default_hook(args)

    hook.quiets_beam_messages = True
    return hook


def main(argv=None) -> int:
    """Console entry: 2 for a problem found before the run (one line), 3 for a run that failed (one
    line naming the cause, e.g. a full disk), 1 when the outcomes do not account for every matched
    file (a bug), 4 when the run finished but some files failed for a transient reason (storage or
    server unavailable past the retry deadline: run it again) or the FHIR server did not answer at
    start, else 0."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # The in-process runner logs a failing step's traceback before raising it; the cause is
    # printed below in one line, so the page of Beam frames stays off the console.
    logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    logging.getLogger("apache_beam.utils.subprocess_server").setLevel(logging.ERROR)
    job_errors = JobErrors()
    for handler in logging.getLogger().handlers:
        handler.addFilter(job_errors)
    if not getattr(threading.excepthook, "quiets_beam_messages", False):
        threading.excepthook = quiet_message_reader(threading.excepthook)
    try:
        summary = run(argv)
    except FhirServerError as exc:  # not answering at start: run again later (4); refusing: 2
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE if exc.transient else 2
    except (output.OutputError, DicomWebError, gcs.GcsAccessError, StateError, AuthError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except output.OutputFull as exc:
        print(f"error: the run failed: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # a failed run: one line, not Beam's page of nested tracebacks
        print(f"error: the run failed: {first_line(exc, job_errors.after_last_messages())}", file=sys.stderr)
        return 3
    if not summary:  # --follow stopped before its first cycle finished
        return 0
    if not accounted(summary):
        _LOG.error("outcomes do not add up to files matched: %s", summary["outcomes"])
        return 1
    if any(summary["errors_by_reason"].get(str(reason)) for reason in TRANSIENT_REASONS):
        return EXIT_INCOMPLETE
    return 0
