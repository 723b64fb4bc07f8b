"""Case (f): the CLI end to end on one core (in-process runner, start-up included) vs (a).

The baseline (a) and the CLI are pinned to the same single CPU in the same run, so the ratio
holds on a shared, noisy machine as long as the two are measured back to back.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def pinned(cpu: int):
    def pin():
        os.sched_setaffinity(0, {cpu})
    return pin if hasattr(os, "sched_setaffinity") else None


def cli_one_core(archive, out, cpu: int = 0, log_path=None) -> dict:
    """Wall seconds of ``python -m beam_pipeline`` from process start to exit, on one CPU."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "beam_pipeline", "--input", str(archive), "--output", str(out), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pinned(cpu))
    seconds = time.perf_counter() - t0
    if log_path:
        Path(log_path).write_text(done.stdout + done.stderr)
    if done.returncode:
        return {"error": f"rc={done.returncode}: {done.stderr[-500:]}"}
    summary = json.loads((Path(out) / "_report" / "summary.json").read_text())
    instances = summary["outcomes"]["converted"]
    return {"cmd": " ".join(cmd), "seconds": seconds, "instances": instances, "rate": instances / seconds,
            "pipeline_seconds": summary["seconds"]}
