#!/usr/bin/env bash
# Install everything bdr needs on a fresh Debian machine, skipping what is already there.
#
#   scripts/bootstrap.sh          build + test dependencies
#   scripts/bootstrap.sh --bench  also the benchmark baselines (pglogical)
#
# Idempotent: a second run checks and returns in seconds. Prints what it does, so a long
# first run (cargo-pgrx compiles for ~13 minutes on 2 cores) is never a silent terminal.
set -euo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
WANT_BENCH=0
[ "${1:-}" = "--bench" ] && WANT_BENCH=1

say() { printf '\033[1;34m[bootstrap]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    say "not root and no sudo: install packages by hand if any are missing"; fi
fi

# --- Debian packages -----------------------------------------------------------------
pkgs=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-client-$PG_MAJOR
      libpq-dev libclang-dev clang pkg-config sudo util-linux)
[ "$WANT_BENCH" = 1 ] && pkgs+=(postgresql-$PG_MAJOR-pglogical linux-perf)

installed_version() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$3=="installed"{print $4}'; }

missing=()
for p in "${pkgs[@]}"; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
# The server and its headers must be the same build, or the extension may not load.
srv=$(installed_version postgresql-$PG_MAJOR)
dev=$(installed_version postgresql-server-dev-$PG_MAJOR)
if [ -n "$srv" ] && [ -n "$dev" ] && [ "$srv" != "$dev" ]; then
  say "postgresql-$PG_MAJOR ($srv) and postgresql-server-dev-$PG_MAJOR ($dev) differ: upgrading both"
  missing+=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Installing the server and headers together keeps their versions equal.
  $SUDO apt-get install -y -qq postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR "${missing[@]}" >/dev/null
  say "Debian packages installed"
else
  say "Debian packages present (postgresql-$PG_MAJOR $srv)"
fi

# --- Rust toolchain pieces -----------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

have_pgrx=$(cargo pgrx --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have_pgrx" != "$PGRX_VERSION" ]; then
  say "installing cargo-pgrx $PGRX_VERSION (about 13 minutes on 2 cores; progress below)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked 2>&1 |
    grep --line-buffered -E '^\s*(Compiling|Installing|Installed|Finished|error)' |
    awk '/Compiling/{n++; if (n%25==0) {print "  ... " n " crates compiled"; fflush()}} !/Compiling/{print; fflush()}'
  [ "$(cargo pgrx --version | awk '{print $2}')" = "$PGRX_VERSION" ] || { echo "cargo-pgrx install failed" >&2; exit 1; }
else
  say "cargo-pgrx $PGRX_VERSION present"
fi

PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  say "pointing pgrx at $PG_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
else
  say "pgrx configured for $PG_CONFIG"
fi

# The extension's files go into the system PostgreSQL's directories; make sure the
# postgres OS user (which runs every test server) can read the build tree's results.
say "ready: $("$PG_CONFIG" --version), cargo-pgrx $PGRX_VERSION"
