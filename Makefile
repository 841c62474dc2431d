# bdr — the targets a PostgreSQL extension user expects.
#
#   make demo      build, install, start a 3-node local cluster and show replication
#   make test      every test tier: pure Rust, #[pg_test] in a server, multi-node scenarios
#   make install   build (release) and install the extension into the system PostgreSQL 15
#   make package   Debian package of the release build (target/debian/postgresql-15-bdr_*.deb)
#   make bench     benchmarks against native logical replication and pglogical
#   make bench-profile  perf profiles of the bdr and native apply processes
#   make bench-count    instructions per applied transaction (callgrind), bdr and native
#   make bench-keys     ids/s of bdr.snowflake_nextval vs nextval on one node
#   make lint      rustfmt, clippy, shellcheck, and the tests of the scripts
#   make test-bare BARE=demo|ci   the README's commands on a bare Debian 12 (debootstrap, root)
#   make clean     remove build output and scratch clusters
#
# Every target bootstraps what it needs first (scripts/bootstrap.sh, idempotent).

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PG_CONFIG
# Scratch space for test clusters (kept on failure, printed in the test output).
BDR_TEST_DIR ?= /tmp/bdr_pgtest
export BDR_TEST_DIR
DEMO_DIR ?= $(CURDIR)/.demo
# Multi-node scenarios run this many at a time (each starts its own postmasters).
TEST_THREADS ?= 2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo --sudo)

.PHONY: all bootstrap build install install-debug package test-package test-bare test test-unit test-pg test-cluster demo demo-stop \
        bench bench-profile bench-count bench-keys soak fmt lint shellcheck test-scripts test-alerts clean

all: build

bootstrap:
	@bash scripts/bootstrap.sh

build: bootstrap
	cargo build

install: bootstrap
	@echo "==> building (release) and installing the bdr extension into $$($(PG_CONFIG) --pkglibdir)"
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(SUDO)

# Internal: the debug build (debug assertions on, faster to compile) that the multi-node
# test tier runs against. `make test` and `make soak` use it; `make install` is release.
install-debug: bootstrap
	@echo "==> building (debug, for the tests) and installing the bdr extension into $$($(PG_CONFIG) --pkglibdir)"
	cargo pgrx install --pg-config $(PG_CONFIG) $(SUDO)
	@# The previous release's complete SQL, for the upgrade test only (pg_test/tests/upgrade.rs):
	@# `CREATE EXTENSION bdr VERSION '0.1.0'` then `ALTER EXTENSION bdr UPDATE`. Not shipped.
	$(if $(SUDO),sudo) install -m 0644 pg_test/fixtures/bdr--0.1.0.sql "$$($(PG_CONFIG) --sharedir)/extension/"

# A Debian package of the release build, for servers without Rust (see README.md,
# "Production install").
package: bootstrap
	@bash scripts/package.sh

# On demand, not part of `make test`: builds the package, replaces any `make install` files
# in the system PostgreSQL 15 with it (dpkg -i), runs a 2-node group, then dpkg -r.
test-package: bootstrap
	@bash scripts/test-package.sh

# On demand (root, network to the Debian mirror and crates.io): the README's commands on a
# debootstrap'ed bare Debian 12 with only Rust, make, git and curl, in a clone without
# ../shared. BARE=demo (make demo; about 15 min) or BARE=ci (bash .ci/run; over 30 min).
BARE ?= demo
test-bare:
	@bash scripts/test-bare-machine.sh $(BARE)

test: bootstrap
	@echo "==> [1/3] pure Rust tests (wire format, conflict policy)"
	cargo test -p bdr-core
	@echo "==> [2/3] #[pg_test] tests inside a PostgreSQL server"
	$(MAKE) --no-print-directory test-pg
	@echo "==> [3/3] multi-node scenarios on real postmasters (debug build)"
	$(MAKE) --no-print-directory install-debug
	$(MAKE) --no-print-directory test-cluster

test-unit: bootstrap
	cargo test -p bdr-core

test-pg: bootstrap
	@mkdir -p $(BDR_TEST_DIR) && chmod 1777 $(BDR_TEST_DIR)
	CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA=$(BDR_TEST_DIR)/pgrx-data \
	  cargo pgrx test pg15

test-cluster: bootstrap
	cargo test -p pg_test -- --test-threads=$(TEST_THREADS) --nocapture
	@echo "==> streamed transactions again, with the stream writer beside 4 parallel writers"
	BDR_TEST_CONF='bdr.writers_per_peer=4' cargo test -p pg_test --test streaming -- --test-threads=$(TEST_THREADS) --nocapture

demo: install
	@bash scripts/demo.sh start "$(DEMO_DIR)"

demo-stop:
	@bash scripts/demo.sh stop "$(DEMO_DIR)"

# Long runs, not part of `make test`: 300 seeds of random conflicting writes, then the
# fault soak (random partitions, hung links, kills and restarts under conflicting writes
# for BDR_FAULT_SOAK_MIN minutes, default 5) and a node down for BDR_OUTAGE_SECS (default
# 600) while the others write 1M+ rows (pg_test/tests/faults.rs, docs/testing.md).
soak: install-debug
	BDR_SOAK_SEEDS=$${BDR_SOAK_SEEDS:-300} cargo test -p pg_test --test conflicts randomized -- --nocapture
	BDR_FAULT_SOAK_MIN=$${BDR_FAULT_SOAK_MIN:-5} cargo test -p pg_test --test faults -- --ignored --nocapture --test-threads=1

bench: bootstrap
	@bash scripts/bootstrap.sh --bench
	@bash bench/run.sh

bench-profile: bootstrap
	@bash scripts/bootstrap.sh --bench
	@bash bench/run.sh profile

bench-count: bootstrap
	@bash scripts/bootstrap.sh --bench
	@bash bench/run.sh count

bench-keys: bootstrap
	@bash bench/run.sh keys

fmt:
	cargo fmt --all

# Every shell script in the repository (CI's entry point has no .sh suffix).
SHELL_SCRIPTS = $(shell find . -name '*.sh' -not -path './target/*' -not -path './.demo/*' | sort) .ci/run

lint: bootstrap
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(MAKE) --no-print-directory shellcheck test-scripts test-alerts

shellcheck:
	shellcheck $(SHELL_SCRIPTS)

# The Prometheus alerting rules: syntax and unit tests (promtool, Debian package
# `prometheus`; skipped with a note when it is not installed).
PROMTOOL ?= promtool
test-alerts:
	@if command -v $(PROMTOOL) >/dev/null 2>&1; then \
	  set -e; cd contrib/prometheus; \
	  $(PROMTOOL) check rules bdr-alerts.yml; \
	  $(PROMTOOL) test rules bdr-alerts.test.yml; \
	else echo "note: $(PROMTOOL) not installed: alert rule tests skipped (apt-get install prometheus, or PROMTOOL=/path/to/promtool)"; fi

# Tests of the scripts themselves (no build, no network): the bootstrap on a simulated
# empty machine.
test-scripts:
	bash scripts/test-bootstrap.sh

clean:
	cargo clean
	rm -rf $(BDR_TEST_DIR) $(DEMO_DIR)
