#!/usr/bin/env bash
# Install what certbatch, its demo and its tests need on a Debian machine (run as root), into a
# virtualenv at .venv (Debian's own Python refuses system-wide pip installs, PEP 668).
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(pebble curl openssl ca-certificates)
# The tests apply certificates to real servers, each started by the tests on 127.0.0.1.
[ "${1:-}" = "--test" ] && packages+=(nginx shellcheck haproxy apache2 postfix dovecot-core
                                      openssh-server openssh-client
                                      bind9 bind9-utils pdns-server pdns-backend-sqlite3 sqlite3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
command -v python3 >/dev/null || packages+=(python3 python3-venv)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: please install as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # postfix asks what kind of mail host this is: a local-only one (the tests run their own).
    echo "postfix postfix/main_mailer_type select Local only" | debconf-set-selections
    apt-get update -qq
    # The DNS servers (bind9, pdns-server) would start their own services on port 53, and the
    # second one to start fails its install: no service starts during this install (where no
    # policy says otherwise). The tests start their own servers on free loopback ports.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    # (On a full Debian install nginx also starts its own service on port 80; the tests leave
    # it alone and run their own nginx on free loopback ports.)
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
