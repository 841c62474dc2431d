#!/usr/bin/env bash
# make test-package: build the Debian package and prove it is a working production install.
#
#   scripts/test-package.sh               build, inspect, then on THIS machine: remove any
#                                         `make install` files of bdr from the system
#                                         PostgreSQL 15, `dpkg -i` the package, run a
#                                         2-node group from it, check rows replicate both
#                                         ways, stop it and `dpkg -r` the package
#   scripts/test-package.sh --build-only  build and inspect the .deb only (touches nothing)
#   scripts/test-package.sh --unpack-into-pg-config
#                                         instead of dpkg -i, unpack the package's files into
#                                         $PG_CONFIG's directories (a relocated PostgreSQL 15
#                                         used for testing), run the same 2-node check, and
#                                         put back the files that were there before
#
# The full run changes the system PostgreSQL's extension directory: afterwards bdr is no
# longer installed there (run `make install` again for the tests). Needs root or sudo.
# Exit status 0 only when every check passed.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

MODE=dpkg
case "${1:-}" in
  "") ;;
  --build-only) MODE=build ;;
  --unpack-into-pg-config) MODE=unpack ;;
  *) echo "usage: $0 [--build-only | --unpack-into-pg-config]" >&2; exit 2 ;;
esac

PG_MAJOR=15
PKG=postgresql-$PG_MAJOR-bdr
SYS_PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
PG_CONFIG=${PG_CONFIG:-$SYS_PG_CONFIG}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
PORT=${TEST_PACKAGE_PORT:-5531}
STEP=start
say() { printf '\033[1;34m[test-package]\033[0m %s\n' "$*"; }
step() { STEP=$1; say "step: $STEP"; }
fail() { printf '\033[1;31m[test-package] FAILED in step "%s": %s\033[0m\n' "$STEP" "$*" >&2; exit 1; }
trap 'printf "\033[1;31m[test-package] FAILED in step \"%s\": %s (exit %s)\033[0m\n" "$STEP" "$BASH_COMMAND" "$?" >&2' ERR
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

# --- build and inspect --------------------------------------------------------------
step "building the package"
deb=$(bash scripts/package.sh | tail -n1)
[ -f "$deb" ] || fail "scripts/package.sh printed no .deb ($deb)"
VERSION=$(dpkg-deb -f "$deb" Version)
say "$deb"

step "inspecting the package"
[ "$(dpkg-deb -f "$deb" Package)" = "$PKG" ] || fail "Package is $(dpkg-deb -f "$deb" Package)"
cargo_version=$(awk '/^\[package\]/{p=1; next} /^\[/{p=0} p && $1=="version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml)
[ "$VERSION" = "$cargo_version" ] || fail "Version $VERSION, Cargo.toml says $cargo_version"
[ "$(basename "$deb")" = "${PKG}_${VERSION}_amd64.deb" ] || fail "file name $(basename "$deb")"
depends=$(dpkg-deb -f "$deb" Depends)
for d in "postgresql-$PG_MAJOR" libpq5; do
  [[ ", $depends, " == *", $d, "* || ", $depends, " == *", $d ("* ]] || fail "Depends ($depends) lacks $d"
done
files=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in "./usr/lib/postgresql/$PG_MAJOR/lib/bdr.so" \
         "./usr/share/postgresql/$PG_MAJOR/extension/bdr.control" \
         "./usr/share/postgresql/$PG_MAJOR/extension/bdr--$VERSION.sql"; do
  grep -qxF "$f" <<<"$files" || fail "the package lacks $f"
done
# Every upgrade script of the tree (ALTER EXTENSION bdr UPDATE on a running node), and not
# the test-only complete SQL of the previous release (pg_test/fixtures).
for s in sql/bdr--*--*.sql; do
  [ -e "$s" ] || continue
  f="./usr/share/postgresql/$PG_MAJOR/extension/$(basename "$s")"
  grep -qxF "$f" <<<"$files" || fail "the package lacks the upgrade script $f"
done
for s in pg_test/fixtures/bdr--*.sql; do
  [ -e "$s" ] || continue
  f="./usr/share/postgresql/$PG_MAJOR/extension/$(basename "$s")"
  ! grep -qxF "$f" <<<"$files" || fail "the package ships the test fixture $f"
done
outside=$(grep -v -e '^\./$' -e '^\./usr/' <<<"$files" || true)
[ -z "$outside" ] || fail "files outside /usr: $outside"
unpacked=$(mktemp -d /tmp/bdr-test-package-deb.XXXXXX)
dpkg-deb -x "$deb" "$unpacked"
grep -qx "default_version = '$VERSION'" "$unpacked/usr/share/postgresql/$PG_MAJOR/extension/bdr.control" ||
  fail "bdr.control's default_version is not $VERSION"
say "package $PKG $VERSION: Depends: $depends; $(wc -l <<<"$files") entries, all under /usr"
if [ "$MODE" = build ]; then
  rm -rf "$unpacked"
  say "OK (build and inspection only)"
  exit 0
fi

# --- install ------------------------------------------------------------------------
libdir_files() { # the extension's files in PostgreSQL's directories, per pg_config $1
  local lib share
  lib=$("$1" --pkglibdir); share=$("$1" --sharedir)/extension
  compgen -G "$lib/bdr.so" || true
  compgen -G "$share/bdr.control" || true
  compgen -G "$share/bdr--*.sql" || true
}
cluster_dir=""
backup=""
cleanup() {
  set +e
  trap - ERR
  if [ -n "$cluster_dir" ] && [ -f "$cluster_dir/nodes.txt" ]; then
    say "cleanup: stopping the test cluster"
    PG_CONFIG=$RUN_PG_CONFIG "$tool" stop --dir "$cluster_dir"
  fi
  if [ "$MODE" = dpkg ] && dpkg -s "$PKG" >/dev/null 2>&1; then
    say "cleanup: dpkg -r $PKG"
    $SUDO dpkg -r "$PKG"
  fi
  if [ "$MODE" = unpack ] && [ -n "$backup" ]; then
    say "cleanup: putting back the files that were in $RUN_PG_CONFIG's directories"
    while read -r f; do rm -f "$f"; done < <(libdir_files "$RUN_PG_CONFIG")
    if [ -s "$backup/list" ]; then
      while read -r f; do cp -p "$backup/files/$(basename "$f")" "$f"; done <"$backup/list"
    fi
    rm -rf "$backup"
  fi
  rm -rf "$unpacked"
  [ -z "$cluster_dir" ] || rm -rf "$cluster_dir"
}
trap cleanup EXIT

if [ "$MODE" = dpkg ]; then
  RUN_PG_CONFIG=$SYS_PG_CONFIG
  step "removing make-install files of bdr from the system PostgreSQL"
  while read -r f; do
    if dpkg -S "$f" >/dev/null 2>&1; then
      fail "$f belongs to package $(dpkg -S "$f" | cut -d: -f1): dpkg -r it first"
    fi
    say "  rm $f"
    $SUDO rm -f "$f"
  done < <(libdir_files "$RUN_PG_CONFIG")
  step "dpkg -i $deb"
  $SUDO dpkg -i "$deb"
  dpkg -s "$PKG" | grep -qx 'Status: install ok installed' || fail "$PKG not installed"
  for f in "/usr/lib/postgresql/$PG_MAJOR/lib/bdr.so" "/usr/share/postgresql/$PG_MAJOR/extension/bdr.control"; do
    [ "$(dpkg -S "$f" | cut -d: -f1)" = "$PKG" ] || fail "$f is not from $PKG"
  done
else
  RUN_PG_CONFIG=$PG_CONFIG
  step "unpacking the package's files into $RUN_PG_CONFIG's directories"
  backup=$(mktemp -d /tmp/bdr-test-package-backup.XXXXXX)
  mkdir -p "$backup/files"
  libdir_files "$RUN_PG_CONFIG" >"$backup/list"
  while read -r f; do cp -p "$f" "$backup/files/"; rm -f "$f"; done <"$backup/list"
  install -m 0644 "$unpacked/usr/lib/postgresql/$PG_MAJOR/lib/bdr.so" "$("$RUN_PG_CONFIG" --pkglibdir)/"
  install -m 0644 "$unpacked/usr/share/postgresql/$PG_MAJOR/extension/"bdr* "$("$RUN_PG_CONFIG" --sharedir)/extension/"
fi

# --- a 2-node group from the installed package --------------------------------------
step "starting 2 nodes with bdr preloaded"
cargo build -q -p pg_test --bin bdr-cluster
tool=$TARGET_DIR/debug/bdr-cluster
cluster_dir=$(mktemp -d /tmp/bdr-test-package.XXXXXX)
chmod 755 "$cluster_dir"
PG_CONFIG=$RUN_PG_CONFIG "$tool" start --dir "$cluster_dir" --nodes 2 --base-port "$PORT" --dbname bdrpkg
port() { awk -v n="$1" '$1==n {print $2}' "$cluster_dir/nodes.txt"; }
dsn() { echo "host=127.0.0.1 port=$(port "$1") dbname=bdrpkg user=postgres"; }
sql() { local n=$1; shift; psql -X -A -t -q -v ON_ERROR_STOP=1 "$(dsn "$n")" -c "$*"; }
# Bounded poll: up to $2 seconds for SQL $3 on node $1 to print $4.
wait_for() {
  local n=$1 secs=$2 q=$3 want=$4 got="" deadline=$((SECONDS + $2))
  while [ "$SECONDS" -lt "$deadline" ]; do
    got=$(sql "$n" "$q" 2>/dev/null || true)
    [ "$got" = "$want" ] && return 0
    sleep 0.2
  done
  fail "after ${secs}s, $q on $n gave '$got', not '$want'"
}

step "CREATE EXTENSION bdr (version $VERSION) and forming the group"
for n in node1 node2; do sql "$n" "CREATE EXTENSION bdr"; done
for n in node1 node2; do
  v=$(sql "$n" "SELECT extversion FROM pg_extension WHERE extname = 'bdr'")
  [ "$v" = "$VERSION" ] || fail "extension version on $n is $v"
done
sql node1 "CREATE TABLE pkg_check (id int PRIMARY KEY, origin text)"
sql node1 "SELECT bdr.group_create(local_node_name := 'node1', node_external_dsn := '$(dsn node1)')" >/dev/null
sql node2 "SELECT bdr.group_join(local_node_name := 'node2', node_external_dsn := '$(dsn node2)', join_using_dsn := '$(dsn node1)')" >/dev/null
sql node2 "SELECT bdr.wait_for_join(120)" >/dev/null

step "a row written on each node reaches the other"
sql node1 "INSERT INTO pkg_check VALUES (1, 'node1')"
sql node2 "INSERT INTO pkg_check VALUES (2, 'node2')"
wait_for node2 60 "SELECT string_agg(id || '=' || origin, ',' ORDER BY id) FROM pkg_check" "1=node1,2=node2"
wait_for node1 60 "SELECT string_agg(id || '=' || origin, ',' ORDER BY id) FROM pkg_check" "1=node1,2=node2"

step "stopping the group"
PG_CONFIG=$RUN_PG_CONFIG "$tool" stop --dir "$cluster_dir"
rm -rf "$cluster_dir"
cluster_dir=""

if [ "$MODE" = dpkg ]; then
  step "dpkg -r $PKG"
  $SUDO dpkg -r "$PKG"
  for f in "/usr/lib/postgresql/$PG_MAJOR/lib/bdr.so" "/usr/share/postgresql/$PG_MAJOR/extension/bdr.control"; do
    [ ! -e "$f" ] || fail "$f still there after dpkg -r"
  done
  say "note: bdr is no longer installed in the system PostgreSQL; run 'make install' to put it back"
fi
if [ "$MODE" = dpkg ]; then
  say "OK: $PKG $VERSION installs with dpkg, forms a 2-node group that replicates both ways, and is removed"
else
  say "OK: the files of $PKG $VERSION, unpacked into $RUN_PG_CONFIG's PostgreSQL, form a 2-node group that replicates both ways"
fi
