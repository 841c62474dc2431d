#!/usr/bin/env bash
# Tests scripts/bootstrap.sh on a simulated machine that has nothing installed.
#
# Stub commands first on PATH stand in for dpkg-query, apt-get, sudo, id, cargo and
# pg_config; they record what they are asked to do in a state directory (installed
# packages, a command log). HOME and PGRX_HOME point at temp dirs. Nothing real is
# installed and no network is used. Run by `make lint` (and so by .ci/run).
#
# Cases:
#   1. empty machine: exit 0; every listed package installed (server and headers in one
#      apt-get install, via sudo as a non-root user); cargo-pgrx 0.18.1 installed with
#      --locked; `cargo pgrx init --pg15 <pg_config>` run
#   2. second run: installs nothing, runs no init, exit 0
#   3. server and headers at different versions: both upgraded together
#   4. apt-get install fails: exit non-zero, the step and the failing command printed
#   5. cargo install fails: exit non-zero, the step and the command printed
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bootstrap="$here/bootstrap.sh"

# Everything the script is expected to install (keep in step with bootstrap.sh).
expected_pkgs=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 libpq-dev
               libclang-dev clang pkg-config sudo util-linux shellcheck faketime)

tmp=$(mktemp -d /tmp/bdr-test-bootstrap.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
failures=0
pass() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*"; failures=$((failures + 1)); }
check() { # check DESCRIPTION COMMAND...
  local what=$1; shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

# --- the simulated machine -----------------------------------------------------------
# make_machine DIR: stub bin dir, empty state, fresh HOME and PGRX_HOME.
make_machine() {
  local m=$1
  mkdir -p "$m/bin" "$m/state" "$m/home" "$m/pgrx"
  : >"$m/state/installed"   # "package version" lines
  : >"$m/state/log"         # every stubbed command run, one per line

  cat >"$m/bin/dpkg-query" <<'EOF'
#!/usr/bin/env bash
# dpkg-query -W -f='${Status} ${Version}' PKG: like the real one, exit 1 for an unknown package.
echo "dpkg-query $*" >>"$STUB_STATE/log"
pkg=${!#}
line=$(awk -v p="$pkg" '$1==p' "$STUB_STATE/installed")
if [ -z "$line" ]; then
  echo "dpkg-query: no packages found matching $pkg" >&2
  exit 1
fi
printf 'install ok installed %s' "${line#* }"
EOF

  cat >"$m/bin/apt-get" <<'EOF'
#!/usr/bin/env bash
echo "apt-get $*" >>"$STUB_STATE/log"
[ "${STUB_AS_ROOT:-}" = 1 ] || { echo "E: Could not open lock file (are you root?)" >&2; exit 100; }
case "$1" in
  update) exit 0 ;;
  install)
    if [ -n "${STUB_APT_FAIL:-}" ]; then
      echo "E: Unable to locate package $STUB_APT_FAIL" >&2
      exit 100
    fi
    shift
    for a in "$@"; do
      case "$a" in -*) continue ;; esac
      awk -v p="$a" '$1!=p' "$STUB_STATE/installed" >"$STUB_STATE/installed.new"
      mv "$STUB_STATE/installed.new" "$STUB_STATE/installed"
      echo "$a ${STUB_PKG_VERSION:-15.20-0+deb12u1}" >>"$STUB_STATE/installed"
    done
    ;;
  *) echo "apt-get stub: unexpected $*" >&2; exit 100 ;;
esac
EOF

  cat >"$m/bin/sudo" <<'EOF'
#!/usr/bin/env bash
echo "sudo $*" >>"$STUB_STATE/log"
STUB_AS_ROOT=1 exec "$@"
EOF

  cat >"$m/bin/id" <<'EOF'
#!/usr/bin/env bash
# A non-root user, so the script has to use sudo.
[ "$1" = -u ] && { echo 1000; exit 0; }
echo "uid=1000(builder) gid=1000(builder)"
EOF

  cat >"$m/bin/cargo" <<'EOF'
#!/usr/bin/env bash
echo "cargo $*" >>"$STUB_STATE/log"
if [ "$1" = pgrx ]; then
  if [ ! -f "$STUB_STATE/cargo-pgrx" ]; then
    echo "error: no such command: \`pgrx\`" >&2
    exit 101
  fi
  case "$2" in
    --version) echo "cargo-pgrx $(cat "$STUB_STATE/cargo-pgrx")" ;;
    init)
      [ "$3" = --pg15 ] || { echo "cargo pgrx init stub: expected --pg15, got $3" >&2; exit 1; }
      mkdir -p "$PGRX_HOME"
      printf '[configs]\npg15 = "%s"\n' "$4" >"$PGRX_HOME/config.toml"
      echo "  Validating $4"
      ;;
    *) echo "cargo pgrx stub: unexpected $*" >&2; exit 1 ;;
  esac
  exit 0
fi
if [ "$1" = install ] && [ "$2" = cargo-pgrx ]; then
  if [ -n "${STUB_CARGO_FAIL:-}" ]; then
    echo "   Compiling pgrx-pg-config v0.18.1"
    echo "error: failed to compile \`cargo-pgrx v0.18.1\`" >&2
    exit 101
  fi
  version=""
  while [ $# -gt 0 ]; do [ "$1" = --version ] && version=$2; shift; done
  for i in $(seq 1 30); do echo "   Compiling crate$i v1.0.0"; done
  echo "  Installed package \`cargo-pgrx v$version\`"
  echo "$version" >"$STUB_STATE/cargo-pgrx"
  exit 0
fi
echo "cargo stub: unexpected $*" >&2
exit 1
EOF

  cat >"$m/bin/pg_config" <<'EOF'
#!/usr/bin/env bash
echo "pg_config $*" >>"$STUB_STATE/log"
[ "$1" = --version ] && echo "PostgreSQL 15.20 (Debian 15.20-0+deb12u1)"
EOF
  chmod +x "$m/bin/"*
}

# run_bootstrap DIR [ENV=VALUE...]: run the script on machine DIR; output in DIR/out.
run_bootstrap() {
  local m=$1; shift
  set +e
  env -i PATH="$m/bin:/usr/bin:/bin" HOME="$m/home" PGRX_HOME="$m/pgrx" \
      STUB_STATE="$m/state" PG_CONFIG="$m/bin/pg_config" TERM=dumb "$@" \
      bash "$bootstrap" >"$m/out" 2>&1
  local rc=$?
  set -e
  echo "$rc" >"$m/rc"
}

show() { # on a failure, the script's output helps
  sed 's/^/    | /' "$1/out"
}
log_has() { grep -qE -- "$2" "$1/state/log"; }
out_has() { grep -qF -- "$2" "$1/out"; }
rc_is() { [ "$(cat "$1/rc")" = "$2" ]; }
rc_nonzero() { [ "$(cat "$1/rc")" != 0 ]; }

# --- 1. empty machine ----------------------------------------------------------------
m=$tmp/empty
make_machine "$m"
run_bootstrap "$m"
f0=$failures
check "empty machine: exit status 0" rc_is "$m" 0
for p in "${expected_pkgs[@]}"; do
  check "empty machine: $p installed" grep -q "^$p " "$m/state/installed"
done
check "empty machine: apt-get run through sudo (non-root user)" log_has "$m" '^sudo apt-get install '
install_line=$(grep '^apt-get install ' "$m/state/log" || true)
both_together() { [[ " $install_line " == *" postgresql-15 "* && " $install_line " == *" postgresql-server-dev-15 "* ]]; }
check "empty machine: server and headers in one apt-get install" both_together
check "empty machine: exactly one apt-get install" [ "$(grep -c '^apt-get install ' "$m/state/log")" = 1 ]
check "empty machine: cargo install cargo-pgrx --version 0.18.1 --locked" \
  log_has "$m" '^cargo install cargo-pgrx --version 0\.18\.1 --locked$'
check "empty machine: cargo pgrx init --pg15 <PG_CONFIG>" \
  log_has "$m" "^cargo pgrx init --pg15 $m/bin/pg_config\$"
check "empty machine: prints each step" out_has "$m" "step: Debian packages: installing"
check "empty machine: prints the commands it runs" out_has "$m" "\$ sudo apt-get install -y -qq postgresql-15"
check "empty machine: compile progress is counted, not listed" out_has "$m" "... 25 crates compiled"
check "empty machine: says it is ready" out_has "$m" "ready: PostgreSQL 15.20"
[ "$failures" = "$f0" ] || show "$m"

# --- 2. second run -------------------------------------------------------------------
cp "$m/state/log" "$tmp/log.first"
run_bootstrap "$m"
f0=$failures
check "second run: exit status 0" rc_is "$m" 0
new=$(tail -n +"$(($(wc -l <"$tmp/log.first") + 1))" "$m/state/log")
no_installs() { ! grep -qE '^(apt-get (install|update)|cargo install|cargo pgrx init)' <<<"$new"; }
check "second run: installs nothing (no apt-get, cargo install or pgrx init)" no_installs
check "second run: reports packages present" out_has "$m" "Debian packages present (postgresql-15 15.20-0+deb12u1)"
[ "$failures" = "$f0" ] || { show "$m"; echo "    commands: $new"; }

# --- 3. server and headers differ ----------------------------------------------------
m=$tmp/skew
make_machine "$m"
for p in "${expected_pkgs[@]}"; do echo "$p 15.20-0+deb12u1" >>"$m/state/installed"; done
sed -i 's/^postgresql-server-dev-15 .*/postgresql-server-dev-15 15.19-0+deb12u1/' "$m/state/installed"
echo 0.18.1 >"$m/state/cargo-pgrx"
run_bootstrap "$m"
f0=$failures
check "version skew: exit status 0" rc_is "$m" 0
check "version skew: server and headers upgraded together" \
  log_has "$m" '^apt-get install -y -qq postgresql-15 postgresql-server-dev-15( |$)'
check "version skew: headers now match the server" grep -q '^postgresql-server-dev-15 15.20-0+deb12u1$' "$m/state/installed"
[ "$failures" = "$f0" ] || show "$m"

# --- 4. apt-get install fails --------------------------------------------------------
m=$tmp/aptfail
make_machine "$m"
run_bootstrap "$m" STUB_APT_FAIL=libclang-dev
f0=$failures
check "apt-get failure: exit status non-zero" rc_nonzero "$m"
check "apt-get failure: names the step" out_has "$m" 'FAILED in step "Debian packages: installing'
check "apt-get failure: names the failing command" out_has "$m" "failing command: sudo apt-get install -y -qq postgresql-15 postgresql-server-dev-15"
check "apt-get failure: apt-get's own error shown" out_has "$m" "E: Unable to locate package libclang-dev"
check "apt-get failure: stops there (no cargo install)" sh -c "! grep -q '^cargo install' '$m/state/log'"
[ "$failures" = "$f0" ] || show "$m"

# --- 5. cargo install fails ----------------------------------------------------------
m=$tmp/cargofail
make_machine "$m"
run_bootstrap "$m" STUB_CARGO_FAIL=1
f0=$failures
check "cargo failure: exit status non-zero" rc_nonzero "$m"
check "cargo failure: names the step" out_has "$m" 'FAILED in step "Rust: cargo-pgrx 0.18.1"'
check "cargo failure: names the failing command" out_has "$m" "failing command: cargo install cargo-pgrx --version 0.18.1 --locked"
check "cargo failure: cargo's error shown" out_has "$m" "error: failed to compile"
check "cargo failure: no pgrx init after it" sh -c "! grep -q '^cargo pgrx init' '$m/state/log'"
[ "$failures" = "$f0" ] || show "$m"

if [ "$failures" -gt 0 ]; then
  echo "test-bootstrap: $failures check(s) FAILED"
  exit 1
fi
echo "test-bootstrap: all checks passed"
