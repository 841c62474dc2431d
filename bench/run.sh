#!/usr/bin/env bash
# make bench / make bench-profile: build bdr in release mode, install it, and run every workload against bdr,
# native logical replication and pglogical. Prints the table and writes bench/results/latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SUDO=$([ "$(id -u)" = 0 ] || echo --sudo)
echo "==> building and installing bdr (release, with line tables for profiles)"
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo pgrx install --release --pg-config "$PG_CONFIG" ${SUDO:+"$SUDO"}
if [ "${1:-}" = keys ]; then
  # make bench-keys: ids/s of bdr.snowflake_nextval vs nextval on one node.
  cargo run --release -q -p bdr-bench -- keys
  exit 0
fi
if [ "${1:-}" = profile ]; then
  # make bench-profile: perf profiles of the apply process, bdr and native side by side.
  for sys in bdr native; do
    echo "==> profiling the $sys apply process (BENCH_SCALE=${BENCH_SCALE:-1})"
    cargo run --release -q -p bdr-bench -- profile "$sys"
  done
  exit 0
fi
echo "==> running the benchmarks (BENCH_SCALE=${BENCH_SCALE:-1})"
cargo run --release -q -p bdr-bench
