#!/usr/bin/env bash
# Installs Debian's OpenSSH server for the SSH tests. The tests start their own sshd
# (tests/sshd.py: 127.0.0.1, a free port, generated keys); nothing is started here.
set -euo pipefail
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null || ! command -v ss >/dev/null; then
    # Without systemd the package's own service start would fail the install: forbid it.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client iproute2 procps >/dev/null
fi
