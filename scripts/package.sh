#!/usr/bin/env bash
# make package: a Debian package of the release build, for database servers without Rust.
#
#   scripts/package.sh            builds target/debian/postgresql-15-bdr_<version>_amd64.deb
#
# The files go where Debian's postgresql-15 looks for extensions
# (/usr/lib/postgresql/15/lib, /usr/share/postgresql/15/extension), whichever PostgreSQL 15
# PG_CONFIG names for the build (a relocated copy builds the same package). Depends:
# postgresql-15 and the package of every shared library bdr.so links directly (found with
# readelf and dpkg -S; libpq5 among them). The version is [package] version in Cargo.toml.
# Prints the path of the .deb as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=15
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
PKG=postgresql-$PG_MAJOR-bdr
ARCH=$(dpkg --print-architecture)
TARGET_DIR=${CARGO_TARGET_DIR:-target}
say() { printf '\033[1;34m[package]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[package] %s\033[0m\n' "$*" >&2; exit 1; }

for tool in dpkg-deb readelf ldd; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian packages dpkg, binutils, libc-bin)"
done
have_major=$("$PG_CONFIG" --version | awk '{split($2, v, "."); print v[1]}')
[ "$have_major" = "$PG_MAJOR" ] || die "$PG_CONFIG is PostgreSQL $have_major, not $PG_MAJOR"

# The version of the root package (the first `version =` after [package]).
VERSION=$(awk '/^\[package\]/{p=1; next} /^\[/{p=0} p && $1=="version" {gsub(/"/, "", $3); print $3; exit}' Cargo.toml)
[ -n "$VERSION" ] || die "no [package] version in Cargo.toml"

out="$TARGET_DIR/debian/pgrx-out"
stage="$TARGET_DIR/debian/${PKG}_${VERSION}_${ARCH}"
deb="$TARGET_DIR/debian/${PKG}_${VERSION}_${ARCH}.deb"
rm -rf "$out" "$stage" "$deb"

say "building the release extension: cargo pgrx package --pg-config $PG_CONFIG"
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$out" >&2

# cargo pgrx package lays files out under $out at pg_config's own paths.
src_lib="$out$("$PG_CONFIG" --pkglibdir)"
src_ext="$out$("$PG_CONFIG" --sharedir)/extension"
[ -f "$src_lib/bdr.so" ] || die "no bdr.so in $src_lib"
[ -f "$src_ext/bdr.control" ] || die "no bdr.control in $src_ext"
compgen -G "$src_ext/bdr--*.sql" >/dev/null || die "no bdr--*.sql in $src_ext"

dst_lib="$stage/usr/lib/postgresql/$PG_MAJOR/lib"
dst_ext="$stage/usr/share/postgresql/$PG_MAJOR/extension"
install -d "$dst_lib" "$dst_ext" "$stage/DEBIAN" "$stage/usr/share/doc/$PKG"
install -m 0644 "$src_lib/bdr.so" "$dst_lib/"
install -m 0644 "$src_ext/bdr.control" "$src_ext"/bdr--*.sql "$dst_ext/"
install -m 0644 README.md "$stage/usr/share/doc/$PKG/README.md"
printf 'bdr %s\nLicense: PostgreSQL\n' "$VERSION" >"$stage/usr/share/doc/$PKG/copyright"

# Depends: the server, and the package owning each library bdr.so links directly.
deps=("postgresql-$PG_MAJOR")
while read -r lib; do
  # "libpq.so.5 => /lib/.../libpq.so.5 (0x...)", or "/lib64/ld-linux-x86-64.so.2 (0x...)"
  path=$(ldd "$dst_lib/bdr.so" | awk -v l="$lib" '
    $1 == l && $3 ~ /^\// {print $3; exit}
    $1 ~ /^\// {n = split($1, a, "/"); if (a[n] == l) {print $1; exit}}')
  [ -n "$path" ] || die "bdr.so needs $lib, which ldd does not resolve"
  owner=""
  for p in "$path" "$(realpath "$path")" "/usr$path"; do
    owner=$(dpkg -S "$p" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$owner" ] && break
  done
  [ -n "$owner" ] || die "no Debian package owns $path (needed by bdr.so)"
  say "bdr.so needs $lib ($path, package $owner)"
  [[ " ${deps[*]} " == *" $owner "* ]] || deps+=("$owner")
done < <(readelf -d "$dst_lib/bdr.so" | awk '/\(NEEDED\)/ {gsub(/[][]/, "", $5); print $5}')

depends=$(printf '%s, ' "${deps[@]}")
depends=${depends%, }
installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: ${DEB_MAINTAINER:-bdr developers <bdr@localhost>}
Installed-Size: $installed_size
Depends: $depends
Section: database
Priority: optional
Description: multi-master logical replication for PostgreSQL $PG_MAJOR (bdr)
 bdr is a PostgreSQL extension for multi-master (bi-directional) logical
 replication: every node accepts writes, and changes stream to every other node.
 This package holds the release build of the extension (bdr.so, bdr.control and
 its SQL). Add bdr to shared_preload_libraries, then CREATE EXTENSION bdr.
EOF

say "Depends: $depends"
dpkg-deb --root-owner-group --build "$stage" "$deb" >&2
echo "$deb"
