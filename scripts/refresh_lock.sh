#!/usr/bin/env bash
# The one way to move the tested versions. Re-resolves locks/all.txt (everything the tests install:
# runtime, test, bench, docs and dask extras, with hashes) and locks/workers.txt (what Dataflow, Flink
# and Dask workers install: runtime and dask, the same versions) within pyproject.toml's ranges,
# prints what moved, installs it into .venv and runs ./run_tests.sh. The new lock is kept only if the
# suite passes; otherwise the old one is put back. Commit locks/ (and docs/testing.md's versions) then.
#
#   scripts/refresh_lock.sh                                  keep every pin that still fits pyproject.toml
#                                                            (after a dependency was added or its range changed)
#   scripts/refresh_lock.sh --upgrade                        everything to the newest allowed version
#   scripts/refresh_lock.sh --upgrade-package apache-beam    only that package (and what it needs)
#   scripts/refresh_lock.sh --upgrade-package apache-beam==2.78.0 -- -x tests/test_runners.py
#       (arguments after -- go to ./run_tests.sh, i.e. to pytest)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
moves=()
while [ $# -gt 0 ]; do
  case "$1" in
    --upgrade-package) moves+=(--upgrade-package "$2"); shift 2 ;;
    --upgrade) moves+=(--upgrade); shift ;;
    --) shift; break ;;
    *) echo "usage: $0 [--upgrade | --upgrade-package NAME[==VERSION]...] [-- pytest arguments]" >&2; exit 2 ;;
  esac
done

TOOLS="$ROOT/.venv-lock"  # uv, from PyPI's wheel, kept out of the project's venv
if [ ! -x "$TOOLS/bin/uv" ]; then
  python3 -m venv "$TOOLS" && "$TOOLS/bin/python" -m pip install -q uv
fi
compile() {  # the same flags every time: Python 3.11 and newer, any platform, pyproject.toml's ranges
  "$TOOLS/bin/uv" pip compile -q pyproject.toml --python-version 3.11 --universal \
    --custom-compile-command "scripts/refresh_lock.sh" "$@"
}

previous="$(mktemp -d)"
cp locks/all.txt locks/workers.txt "$previous/"
compile --extra test --extra bench --extra docs --extra dask --generate-hashes -o locks/all.txt ${moves[@]+"${moves[@]}"}
compile --extra dask --no-annotate -c locks/all.txt -o locks/workers.txt

python3 - "$previous/all.txt" locks/all.txt <<'PY'
import re, sys
def pins(path):
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;\\\n]+)", open(path).read(), re.M))
old, new = pins(sys.argv[1]), pins(sys.argv[2])
moved = [f"{n} {old[n]} -> {new[n]}" for n in sorted(old.keys() & new.keys()) if old[n] != new[n]]
added = [f"{n} {new[n]}" for n in sorted(new.keys() - old.keys())]
gone = [f"{n} {old[n]}" for n in sorted(old.keys() - new.keys())]
print(f"lock: {len(moved)} moved, {len(added)} added, {len(gone)} removed, {len(new)} packages")
for title, items in (("moved", moved), ("added", added), ("removed", gone)):
    for item in items:
        print(f"  {title}: {item}")
PY
if cmp -s "$previous/all.txt" locks/all.txt && cmp -s "$previous/workers.txt" locks/workers.txt; then
  echo "the lock is current: nothing to test"
  exit 0
fi

if ./run_tests.sh "$@"; then
  echo "the suite passes on the new lock: commit locks/ (and the versions named in docs/testing.md)"
else
  cp "$previous/all.txt" "$previous/workers.txt" locks/
  echo "the suite fails on the new lock: the previous lock is back in locks/ (.venv is reinstalled from it on the next run)" >&2
  exit 1
fi
