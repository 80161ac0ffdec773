#!/usr/bin/env bash
# Our listener in the shared C-STORE harness (../../../shared/bench/ingest), beside Orthanc,
# dcmtk and pynetdicom: same files, same sender, same machine, same run.
#   bash benchmarks/ingest/run.sh            # REPEATS=2 by default; any harness knob works
# Needs root (apt-get for dcmtk, orthanc, postgresql-15) and `make install` done first.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
HARNESS=${HARNESS:-$ROOT/../shared/bench/ingest/run_bench.sh}
CLI=$ROOT/.venv/bin/pacs-annotate
[[ -x $CLI ]] || { echo "run 'make install' first" >&2; exit 1; }
export OURS_CMD="$CLI serve --bind 127.0.0.1 --port \$OURS_PORT --ae-title \$OURS_AET --storage-dir \$BENCH_STORAGE_DIR"
export OURS_SETUP_CMD="$CLI migrate"
export OURS_COUNT_SQL='SELECT count(*) FROM instances'
export OURS_NAME=${OURS_NAME:-pacs-annotate}
export PACS_LOG_LEVEL=${PACS_LOG_LEVEL:-WARNING}
export REPEATS=${REPEATS:-2}
exec bash "$HARNESS" "$@"
