#!/usr/bin/env bash
# Set up a virtual environment from scratch and run the default test suite (CPU; about 10 min on
# 2 shared cores: 3 min set-up, 6.5 min tests), then, each in its own command:
# - the slow tests (real-size models, torchrun launches; 13 min on a loaded machine) when POLYCLIP_TEST_SLOW=1;
# - the browser test when Debian's chromium is installed (required when POLYCLIP_TEST_BROWSER=1).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# A CPU build of torch, pinned: a bare `torch` would resolve to a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[all,test]"
# Reference tokenizers (OpenAI's, as shipped by open_clip and clip-anytorch) for parity tests only;
# --no-deps because their dependencies would pull in torchvision.
pip install -q --no-deps open_clip_torch==3.3.0 clip-anytorch==2.6.0
# clip-retrieval's client and front end, to test polyclip's compatible back end with the real ones;
# --no-deps: its own dependencies are a whole back end (flask, torchvision, ...), the client needs only
# `requests` (in the test extra)
pip install -q --no-deps clip-retrieval==2.45.0
ruff check src tests benchmarks
python -m pytest -m "not slow and not browser" -q -p no:cacheprovider
if [ "${POLYCLIP_TEST_SLOW:-0}" = 1 ]; then
  python -m pytest -m "slow and not browser" -q -p no:cacheprovider
fi
if [ -x /usr/bin/chromium ]; then
  python -m pytest -m browser -q -p no:cacheprovider
elif [ "${POLYCLIP_TEST_BROWSER:-0}" = 1 ]; then
  echo "error: the browser test needs Debian's chromium at /usr/bin/chromium" >&2
  exit 1
fi
