#!/usr/bin/env bash
# Install Debian's headless-capable chromium for the report rendering test
# (tests/test_report_browser.py). Idempotent: returns at once when a chromium
# binary is already on PATH. Needs root (or sudo) and apt; prints what it did.
set -euo pipefail

for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then
        echo "chromium already installed: $(command -v "$candidate")"
        exit 0
    fi
done

if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install chromium with your system's package manager" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "installing chromium needs root: rerun as root or install the 'chromium' package" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n 1)" ]; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "chromium installed: $(command -v chromium)"
