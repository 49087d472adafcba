#!/usr/bin/env bash
# Installs Debian's OpenSSH server for the SSH tests. The tests start their own sshd
# (tests/sshd.py: 127.0.0.1, a free port, generated keys); nothing is started here.
set -euo pipefail
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client iproute2 procps >/dev/null
fi
