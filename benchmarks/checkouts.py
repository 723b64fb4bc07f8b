"""Times one function of a benchmark module in several checkouts, alternated: each run in that
checkout's own venv (its code first on ``sys.path``), pinned to one CPU, its printed line shown
under the checkout's name. Shared by ``build_benchmark`` and ``read_benchmark``."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    parser.add_argument("archives", nargs="+")
    parser.add_argument("--baseline", type=Path, action="append", default=[], help="another checkout (with its .venv)")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="this checkout")
    parser.add_argument("--rounds", type=int, default=rounds, help="rounds per checkout and pair (best taken)")
    parser.add_argument("--pairs", type=int, default=2, help="alternated runs of each checkout")


def trees_of(args) -> dict[str, Path]:
    """This checkout and the baselines, by name."""
    return {"this": args.tree.resolve(), **{tree.name: tree.resolve() for tree in args.baseline}}


def alternated(trees: dict[str, Path], pairs: int, module_file: str, call: str) -> int:
    """Runs ``call`` (an expression over the benchmark module, ``m``) once per checkout and pair,
    the checkouts' order reversed every other pair; 1 (the error shown) when a run fails."""
    cpu = min(os.sched_getaffinity(0))
    name_of_module = Path(module_file).stem
    code = (f"import importlib.util as u; s = u.spec_from_file_location({name_of_module!r}, {module_file!r}); "
            f"m = u.module_from_spec(s); s.loader.exec_module(m); {call}")
    for pair in range(pairs):
        for name in (list(trees) if pair % 2 == 0 else list(reversed(trees))):
            python = trees[name] / ".venv" / "bin" / "python"
            out = subprocess.run([str(python), "-c", code], cwd=trees[name], capture_output=True, text=True,
                                 preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            if out.returncode:
                print(out.stderr[-800:], file=sys.stderr)
                return 1
            print(f"  {name:6s} {out.stdout.strip()}")
    return 0
