#!/usr/bin/env bash
# Every set-up step of the tests that needs no root, each skipped when already done and tolerant of
# failure (what cannot be had here makes its tests skip, named in the suite's closing line):
# - validator/ and fhir-server/ (Maven projects: HAPI FHIR's validator and JPA server) are built
#   when java and mvn are on PATH and their sources changed since the last build;
# - the Beam engines are installed through scripts/engines.py at the locked apache-beam version:
#   Prism (Go module proxy), Flink and Spark homes (PyPI) and their job server jars (Maven).
# Sourced by run_tests.sh after ensure_venv.sh ($PY is the venv's python).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREPARE_LOG="${VENV:-$ROOT/.venv}/prepare-tests.log"
: > "$PREPARE_LOG"

install_engine() {
  "$PY" "$ROOT/scripts/engines.py" install "$1" >"$PREPARE_LOG.$1" 2>&1 \
    || echo "($1: not installed here, the tests that need it are skipped: $(tail -n 1 "$PREPARE_LOG.$1" | cut -c1-160))"
}
# Prism (Go; minutes from an empty Go cache) installs while Maven builds; Flink and Spark fetch
# their jars with Maven, so they come after the builds (one Maven at a time on ~/.m2)
install_engine prism & prism_pid=$!

if command -v java >/dev/null && command -v mvn >/dev/null; then
  for project in validator fhir-server; do
    stamp="$ROOT/$project/target/.built"
    if [ -e "$stamp" ] && [ -z "$(find "$ROOT/$project/pom.xml" "$ROOT/$project/src" -newer "$stamp" -print -quit)" ]; then
      continue  # up to date
    fi
    echo "building $project/ (mvn -q -B package) ..."
    # offline first (a filled ~/.m2 needs no network), then online
    if (cd "$ROOT/$project" && { mvn -q -B -o package >>"$PREPARE_LOG" 2>&1 || mvn -q -B package >>"$PREPARE_LOG" 2>&1; }); then
      touch "$stamp"
    else
      echo "($project/ did not build: its tests are skipped; see $PREPARE_LOG)"
    fi
  done
fi

install_engine flink
install_engine spark
wait "$prism_pid" || true
