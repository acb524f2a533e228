#!/bin/sh
# Install everything the pipeline needs on a fresh Debian 12 machine, then the package itself
# into .venv. Safe to run again: it installs only what is missing.
set -eu
cd "$(dirname "$0")"

DEBS="packer qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client haproxy"
missing=""
for pkg in $DEBS; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing >&2
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "setup: installing the pipeline and its Python dependencies into .venv" >&2
    .venv/bin/pip install -q --upgrade pip >&2
    .venv/bin/pip install -q -e ".[test]" >&2
    rm -f .venv/.installed-* && touch "$stamp"
fi
echo "setup: ready (.venv/bin/pipeline)" >&2
