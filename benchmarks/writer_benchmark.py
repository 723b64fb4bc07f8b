"""Peak memory of the NDJSON writer alone: ``--lines`` generated lines of about 1 KiB (one name, as
ImagingStudy lines) written by ``WriteNdjson`` on the in-process runner; prints the process's peak
RSS. Run it with each checkout's Python, alternated, to compare writers:

    flock /tmp/bench.lock /work/wt/base/.venv/bin/python benchmarks/writer_benchmark.py --lines 400000
    flock /tmp/bench.lock .venv/bin/python benchmarks/writer_benchmark.py --lines 400000
"""
from __future__ import annotations

import argparse
import hashlib
import resource
import tempfile
import time

CHUNK = 10_000  # lines made per element


def lines(chunk: int):
    for index in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        digest = hashlib.sha256(str(index).encode()).hexdigest()
        yield "ImagingStudy", '{"id":"%s","text":"%s"}' % (digest, digest * 15)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=400_000)
    args = parser.parse_args(argv)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_pipeline.run.pipeline import local_runner
    from beam_pipeline.run.transforms import WriteNdjson

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="writer-bench-") as temp:
        options = PipelineOptions([])
        with beam.Pipeline(runner=local_runner(options), options=options) as pipeline:
            (pipeline
             | beam.Create(range(-(-args.lines // CHUNK)))
             | beam.FlatMap(lines)
             | WriteNdjson(temp))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{args.lines} lines of ~1 KiB: peak RSS {peak} MiB, {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
