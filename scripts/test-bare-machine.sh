#!/usr/bin/env bash
# make test-bare: the README's commands on a machine that has never seen the project.
#
# Builds a bare Debian 12 (debootstrap --variant=minbase) in a directory, gives it only
# what the README assumes a newcomer has (Rust from rustup, make, git, curl), clones this
# repository into /root/bdr inside it (no ../shared beside it, as in a user's clone) and
# runs, chrooted, `make demo` (and `make demo-stop`) or the CI entry point (`bash
# .ci/run`, i.e. `make test` and `make lint`). Everything the project needs beyond that
# must come from its own bootstrap.
#
#   scripts/test-bare-machine.sh demo|ci [DIR]     (root; DIR defaults to /tmp/bdr-bare)
#
# Needs root, debootstrap (installed if missing) and the Debian mirror and crates.io
# reachable. The Rust toolchain is copied from this machine's rustup (the README's
# prerequisite); extra CA certificates of this machine (/usr/local/share/ca-certificates,
# e.g. an egress proxy's) are copied too, nothing else. On demand only: it takes
# 15 minutes (demo) to over 30 (ci) on 2 cores.
set -euo pipefail
what=${1:-demo}
root=${2:-/tmp/bdr-bare}
repo=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '\n\033[1;34m[bare]\033[0m %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "test-bare-machine: run as root (debootstrap, chroot)" >&2; exit 1; }
case $what in demo | ci) ;; *) echo "usage: $0 demo|ci [DIR]" >&2; exit 2 ;; esac
toolchain=$(rustup toolchain list | awk '/default/ {print $1}')
[ -n "$toolchain" ] || { echo "test-bare-machine: no default rustup toolchain here" >&2; exit 1; }

cleanup() {
  umount -R "$root/dev" 2>/dev/null || true
  umount -R "$root/sys" 2>/dev/null || true
  umount "$root/proc" 2>/dev/null || true
}
trap cleanup EXIT

if [ ! -x "$root/bin/bash" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  say "debootstrap bookworm (minbase) into $root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
fi
cat >"$root/etc/apt/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"

say "what a newcomer has: make, git, curl, Rust ($toolchain) from rustup"
chroot "$root" /bin/bash -c 'export DEBIAN_FRONTEND=noninteractive;
  apt-get update -qq && apt-get install -y -qq make git curl ca-certificates >/dev/null &&
  update-ca-certificates >/dev/null'
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
mkdir -p "$root/root/.rustup/toolchains" "$root/root/.cargo/bin"
[ -d "$root/root/.rustup/toolchains/$toolchain" ] ||
  cp -a "$(readlink -f "$rustup_home/toolchains/$toolchain")" "$root/root/.rustup/toolchains/$toolchain"
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "default"\n' "$toolchain" \
  >"$root/root/.rustup/settings.toml"
for f in cargo rustc rustdoc rustup cargo-clippy cargo-fmt clippy-driver rustfmt; do
  [ -e "$cargo_home/bin/$f" ] && cp -a "$cargo_home/bin/$f" "$root/root/.cargo/bin/"
done
# shellcheck disable=SC2016 # expanded inside the chroot, not here
echo 'export PATH="$HOME/.cargo/bin:$PATH"' >"$root/root/.cargo/env"

say "a fresh clone of $(git -C "$repo" rev-parse --short HEAD) in /root/bdr (no ../shared)"
rm -rf "$root/root/bdr"
git clone -q "$repo" "$root/root/bdr"

case $what in
  demo) cmd='make demo && make demo-stop' ;;
  ci) cmd='bash .ci/run' ;;
esac
say "chroot: $cmd"
env -u RUST_BACKTRACE chroot "$root" /bin/bash -lc ". /root/.cargo/env && cd /root/bdr && $cmd"
say "passed: $cmd on a bare Debian 12"
