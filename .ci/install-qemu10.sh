#!/usr/bin/env bash
# .ci/install-qemu10.sh [PREFIX]: QEMU 10.0 beside the system's QEMU 7.2, for the
# tests that migrate with both (marker qemu10, env QMIGX_QEMU10).
#
# Debian 12 ships QEMU 7.2; its backports suite carries QEMU 10.0. Installing
# that package would replace 7.2, so instead the three packages that make up
# qemu-system-x86_64 (qemu-system-x86, -common, -data) are downloaded from the
# backports suite of the mirror this machine already uses and unpacked into
# PREFIX/root. Their shared libraries are bookworm's own, installed with 7.2.
# PREFIX/bin/qemu-system-x86_64 is a small wrapper that points the 10.0 binary
# at its own modules and firmware. Prints the wrapper's path on the last line.
# Idempotent; needs root (apt).
set -euo pipefail
prefix=${1:-/opt/qmigx-qemu10}
wrapper=$prefix/bin/qemu-system-x86_64

if [ -x "$wrapper" ] && "$wrapper" --version 2>/dev/null | grep -q 'version 10\.'; then
    echo "$wrapper"
    exit 0
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "install-qemu10: Debian's qemu-system-x86 (7.2) must be installed first" >&2
    exit 1
fi

# The mirror serving bookworm here: deb822 sources first, then one-line lists.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    mirror=$(awk '/^URIs:/ {u = $2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' "$f")
    [ -n "$mirror" ] && break
done
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
             | awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}')
fi
if [ -z "$mirror" ]; then
    echo "install-qemu10: no bookworm source in /etc/apt" >&2
    exit 1
fi

list=/etc/apt/sources.list.d/qmigx-qemu10-backports.list
tmp=$(mktemp -d)
cleanup() {
    rm -f "$list"
    rm -rf "$tmp"
    apt-get update -qq >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "deb $mirror bookworm-backports main" > "$list"
apt-get update -qq >/dev/null
chmod 777 "$tmp"   # apt's download user writes here
(cd "$tmp" && apt-get download -qq -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-system-data >/dev/null)

mkdir -p "$prefix/bin" "$prefix/root"
for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$prefix/root"
done
cat > "$wrapper" <<EOF
#!/bin/sh
# QEMU 10.0 from Debian bookworm-backports, unpacked by qmigx's .ci/install-qemu10.sh
root=$prefix/root
export QEMU_MODULE_DIR=\$root/usr/lib/x86_64-linux-gnu/qemu
exec "\$root/usr/bin/qemu-system-x86_64" -L "\$root/usr/share/qemu" -L /usr/share/seabios -L /usr/share/qemu "\$@"
EOF
chmod 755 "$wrapper"
"$wrapper" --version | head -1 >&2
echo "$wrapper"
