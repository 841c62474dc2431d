#!/usr/bin/env bash
# make bench / make bench-profile: build bdr in release mode, install it, and run every workload against bdr,
# native logical replication and pglogical. Prints the table and writes bench/results/latest.md.
# PG_CONFIG picks the PostgreSQL both the install and the benchmark's servers use (exported,
# so bdr-bench's harness starts that installation's binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
SUDO=$([ "$(id -u)" = 0 ] || echo --sudo)
echo "==> building and installing bdr (release, with line tables for profiles) into $("$PG_CONFIG" --pkglibdir)"
CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo pgrx install --release --pg-config "$PG_CONFIG" ${SUDO:+"$SUDO"}
case "${1:-}" in
  keys)
    # make bench-keys: ids/s of bdr.snowflake_nextval vs nextval on one node.
    cargo run --release -q -p bdr-bench -- keys
    ;;
  profile)
    # make bench-profile: perf profiles of the apply process, bdr and native side by side.
    for sys in bdr native; do
      echo "==> profiling the $sys apply process (BENCH_SCALE=${BENCH_SCALE:-1})"
      cargo run --release -q -p bdr-bench -- profile "$sys"
    done
    ;;
  profile-update)
    # Small UPDATE transactions (workload 1b's shape): the apply process, bdr and native.
    for sys in bdr native; do
      echo "==> profiling the $sys apply process on small UPDATEs (BENCH_SCALE=${BENCH_SCALE:-1})"
      cargo run --release -q -p bdr-bench -- profile-update "$sys"
    done
    ;;
  profile-live)
    # Workload 4b's shape with one peer: B's apply process following A live.
    for sys in bdr native; do
      echo "==> profiling the $sys apply process following a live writer (BENCH_SCALE=${BENCH_SCALE:-1})"
      cargo run --release -q -p bdr-bench -- profile-live "$sys"
    done
    ;;
  mem)
    # Workloads 1 and 2 only: the apply process's peak private memory, bdr and native.
    for sys in bdr native; do
      echo "==> apply peak memory, $sys (BENCH_SCALE=${BENCH_SCALE:-1})"
      cargo run --release -q -p bdr-bench -- mem "$sys"
    done
    ;;
  profile-big)
    # Workload 0: A's walsender and B's apply process from one big COMMIT to visible.
    for sys in bdr native; do
      echo "==> profiling one big transaction, COMMIT -> visible, $sys (BENCH_SCALE=${BENCH_SCALE:-1})"
      cargo run --release -q -p bdr-bench -- profile-big "$sys"
    done
    ;;
  count)
    # make bench-count: instructions per applied transaction (callgrind), small UPDATEs and
    # INSERTs, bdr and native: a figure that does not move between runs.
    for shape in update insert; do
      for sys in bdr native; do
        echo "==> counting the $sys apply process's instructions per $shape (BENCH_SCALE=${BENCH_SCALE:-1})"
        cargo run --release -q -p bdr-bench -- "count-$shape" "$sys" | sed -n 1,4p
      done
    done
    for sys in bdr native; do
      echo "==> counting a writer backend's instructions per single-row INSERT, $sys"
      cargo run --release -q -p bdr-bench -- count-writer "$sys" | sed -n 1p
    done
    ;;
  profile-decode)
    # Workload 5: the backend peeking the same WAL through bdr's plugin and pgoutput.
    echo "==> profiling decoding via the SQL functions, bdr and pgoutput (BENCH_SCALE=${BENCH_SCALE:-1})"
    cargo run --release -q -p bdr-bench -- profile-decode
    ;;
  *)
    echo "==> running the benchmarks (BENCH_SCALE=${BENCH_SCALE:-1}, BENCH_ONLY=${BENCH_ONLY:-all})"
    cargo run --release -q -p bdr-bench
    ;;
esac
