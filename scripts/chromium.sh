#!/usr/bin/env bash
# Debian's Chromium for the UI tests (tests/test_ui.py), driven headless by Playwright
# with executable_path=/usr/bin/chromium. Idempotent; never downloads a browser build
# of its own (no `playwright install`).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium
