#!/usr/bin/env bash
# Install the Debian packages that are missing (apt-get update first)
# without letting their maintainer scripts start services. Debian's
# docker.io would otherwise start a dockerd on /var/lib/docker with its
# default storage driver. lcfs needs dockerd started with
# --storage-driver lcfs, and the tests start their own isolated dockerds.
#
# Usage: scripts/apt-install.sh PACKAGE...
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    # Exit status 101 makes invoke-rc.d and deb-systemd-invoke skip every
    # service start. Only a file this script created is removed.
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi

apt-get update -q

# Only missing packages are installed, so a second run upgrades nothing.
missing=()
for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
