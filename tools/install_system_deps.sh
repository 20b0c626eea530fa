#!/usr/bin/env bash
# Install the Debian packages the test suite needs beside Python:
#   - chromium, to render the reports headless (tests/test_report_browser.py);
#   - postgresql, a real server for the shared-study tests (tests/test_tune_workers.py), which start and stop
#     their own cluster in a temporary folder (tools/postgres_server.py); nothing is started here.
# Idempotent: a package whose program is already there is skipped. Needs root (or sudo) and apt.
set -euo pipefail

missing=()
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1 \
        && ! command -v google-chrome >/dev/null 2>&1; then
    missing+=(chromium fonts-dejavu-core)
else
    echo "chromium already installed"
fi
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing+=(postgresql)
else
    echo "postgresql already installed"
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "apt-get not found: install ${missing[*]} with your system's package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "installing ${missing[*]} needs root: rerun as root or install them yourself" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -n 1)" ]; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: ${missing[*]}"
