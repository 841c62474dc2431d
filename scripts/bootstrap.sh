#!/usr/bin/env bash
# Install everything bdr needs on a fresh Debian machine, skipping what is already there.
#
#   scripts/bootstrap.sh          build + test dependencies
#   scripts/bootstrap.sh --bench  also the benchmark baselines (pglogical)
#
# Idempotent: a second run checks and returns in seconds. Prints every step and every
# command it runs, so a long first run (cargo-pgrx compiles for ~13 minutes on 2 cores) is
# never a silent terminal; any failure prints the step and the command that failed, and
# exits non-zero. scripts/test-bootstrap.sh runs it against a simulated empty machine.
set -Eeuo pipefail

PG_MAJOR=15
PGRX_VERSION=0.18.1
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
WANT_BENCH=0
[ "${1:-}" = "--bench" ] && WANT_BENCH=1

say() { printf '\033[1;34m[bootstrap]\033[0m %s\n' "$*"; }

# The current step and command, for the failure message.
STEP="start"
CMD=""
step() {
  STEP=$1
  say "step: $STEP"
}
# Print a command, run it, and remember it while it runs (the ERR trap names it).
run() {
  CMD="$*"
  say "  \$ $CMD"
  "$@"
  CMD=""
}
on_error() {
  local rc=$1 line=$2 cmd=$3 where=""
  # Inside run() the command is "$@": name the expanded command it was given instead.
  if [ -n "$CMD" ]; then cmd=$CMD; else where=" at scripts/bootstrap.sh line $line"; fi
  printf '\033[1;31m[bootstrap] FAILED in step "%s"%s (exit status %s)\033[0m\n' "$STEP" "$where" "$rc" >&2
  printf '[bootstrap] failing command: %s\n' "$cmd" >&2
  exit "$rc"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

step "checking who runs this"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    say "not root and no sudo: install packages by hand if any are missing"; fi
fi
as_root() { if [ -n "$SUDO" ]; then run "$SUDO" "$@"; else run "$@"; fi; }

# --- Debian packages -----------------------------------------------------------------
step "Debian packages: checking what is installed"
pkgs=("postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" "postgresql-client-$PG_MAJOR"
      libpq-dev libclang-dev clang pkg-config sudo util-linux shellcheck faketime)
[ "$WANT_BENCH" = 1 ] && pkgs+=("postgresql-$PG_MAJOR-pglogical" linux-perf valgrind)

# dpkg-query exits 1 for a package it has never heard of: that means "not installed".
installed_version() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$3=="installed"{print $4}'; }

missing=()
for p in "${pkgs[@]}"; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
# The server and its headers must be the same build, or the extension may not load.
srv=$(installed_version "postgresql-$PG_MAJOR")
dev=$(installed_version "postgresql-server-dev-$PG_MAJOR")
if [ -n "$srv" ] && [ -n "$dev" ] && [ "$srv" != "$dev" ]; then
  say "postgresql-$PG_MAJOR ($srv) and postgresql-server-dev-$PG_MAJOR ($dev) differ: upgrading both"
  missing+=("postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR")
fi
if [ "${#missing[@]}" -gt 0 ]; then
  step "Debian packages: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  # Installing the server and headers together keeps their versions equal.
  install=("postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR")
  for p in "${missing[@]}"; do
    [[ " ${install[*]} " == *" $p "* ]] || install+=("$p")
  done
  as_root apt-get install -y -qq "${install[@]}"
  say "Debian packages installed"
else
  say "Debian packages present (postgresql-$PG_MAJOR $srv)"
fi

# --- Rust toolchain pieces -----------------------------------------------------------
step "Rust: finding cargo"
if ! command -v cargo >/dev/null 2>&1; then
  if [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "[bootstrap] FAILED in step \"$STEP\": cargo not found: install Rust (rustup) first" >&2
  exit 1
fi

step "Rust: cargo-pgrx $PGRX_VERSION"
have_pgrx=$({ cargo pgrx --version 2>/dev/null || true; } | awk '{print $2}')
if [ "$have_pgrx" != "$PGRX_VERSION" ]; then
  say "installing cargo-pgrx $PGRX_VERSION (found: ${have_pgrx:-none}; about 13 minutes on 2 cores; progress below)"
  CMD="cargo install cargo-pgrx --version $PGRX_VERSION --locked"
  say "  \$ $CMD"
  # Every line but the per-crate noise is shown (errors in full); crates are counted.
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked 2>&1 |
    awk '/^ *Compiling /{n++; if (n%25==0) {print "  ... " n " crates compiled"; fflush()}; next}
         /^ *(Downloaded|Downloading|Updating|Locking|Adding|Fetching) /{next}
         {print; fflush()}'
  CMD=""
  got=$({ cargo pgrx --version 2>/dev/null || true; } | awk '{print $2}')
  if [ "$got" != "$PGRX_VERSION" ]; then
    echo "[bootstrap] FAILED in step \"$STEP\": after the install, cargo pgrx --version reports '${got:-nothing}'" >&2
    exit 1
  fi
else
  say "cargo-pgrx $PGRX_VERSION present"
fi

step "pgrx: pointing it at $PG_CONFIG"
PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  run cargo pgrx init "--pg$PG_MAJOR" "$PG_CONFIG"
else
  say "pgrx configured for $PG_CONFIG"
fi

step "checking the result"
CMD="$PG_CONFIG --version"
pg_version=$("$PG_CONFIG" --version)
CMD=""
say "ready: $pg_version, cargo-pgrx $PGRX_VERSION"
