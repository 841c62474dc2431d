#!/usr/bin/env bash
# make bench: build bdr in release mode, install it, and run every workload against bdr,
# native logical replication and pglogical. Prints the table and writes bench/results/latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SUDO=$([ "$(id -u)" = 0 ] || echo --sudo)
echo "==> building and installing bdr (release)"
cargo pgrx install --release --pg-config "$PG_CONFIG" $SUDO
echo "==> running the benchmarks (BENCH_SCALE=${BENCH_SCALE:-1})"
cargo run --release -q -p bdr-bench
