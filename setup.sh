#!/usr/bin/env bash
# Installs everything the project needs, into the repo: .venv (Python) and node_modules (npm).
# Idempotent: a step whose inputs have not changed since it last succeeded is skipped.
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "setup.sh: $*" >&2; exit 1; }
trap 'fail "step failed at line $LINENO (see the output above)"' ERR

PYTHON=${PYTHON:-python3}
STAMPS=.venv/.stamps

command -v "$PYTHON" >/dev/null || fail "$PYTHON not found: install Python 3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python >= 3.10 is required"

if [ ! -x .venv/bin/python ]; then
  echo "setup.sh: creating .venv"
  "$PYTHON" -m venv .venv || fail "could not create .venv (is python3-venv installed?)"
fi
mkdir -p "$STAMPS"

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }

req_hash=$(cat requirements.txt | sha256sum | cut -d' ' -f1)
if ! stamp_ok requirements "$req_hash"; then
  echo "setup.sh: installing Python packages (requirements.txt)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  # recbole ships MovieLens-100K as plain files; only those files are read, never its code.
  .venv/bin/python -m pip install --quiet --no-deps recbole==1.2.1
  echo "$req_hash" > "$STAMPS/requirements"
fi

if [ -f package.json ]; then
  command -v npm >/dev/null || fail "npm not found: install Node.js 20 and npm"
  lock_hash=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)
  if ! stamp_ok npm "$lock_hash" || [ ! -d node_modules ]; then
    echo "setup.sh: installing npm packages (npm ci)"
    npm ci --no-audit --no-fund --loglevel=error
    echo "$lock_hash" > "$STAMPS/npm"
  fi
fi

# The contract is compiled once, here, into build/contracts/RoundRegistry.json (Truffle's artifact
# format): the apps only read it, and never start solc.
contract_hash=$(cat contracts/RoundRegistry.sol tools/solc package-lock.json | sha256sum | cut -d' ' -f1)
if ! stamp_ok contract "$contract_hash" || [ ! -f build/contracts/RoundRegistry.json ]; then
  echo "setup.sh: compiling the contract (build/contracts/RoundRegistry.json)"
  .venv/bin/python run.py compile
  echo "$contract_hash" > "$STAMPS/contract"
fi

# Chromium and ChromeDriver drive the browser tests (Debian packages chromium, chromium-driver).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup.sh: installing chromium and chromium-driver (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup.sh: chromium and chromedriver are missing and apt-get cannot run here;" \
         "install the Debian packages chromium and chromium-driver, or the browser tests fail" >&2
  fi
fi

# Benchmark-only packages (Flower, for benchmarks/vs_flower.py): `bash setup.sh --bench`.
# Flower pins an older protobuf and packaging than ours, so it goes into a folder of its own that
# only the benchmark's Flower process puts on its path.
if [ "${1:-}" = "--bench" ]; then
  bench_hash=$(cat benchmarks/requirements-bench.txt | sha256sum | cut -d' ' -f1)
  if ! stamp_ok bench "$bench_hash" || [ ! -d .venv/flwr-overlay ]; then
    echo "setup.sh: installing benchmark packages (benchmarks/requirements-bench.txt) into .venv/flwr-overlay"
    rm -rf .venv/flwr-overlay
    .venv/bin/python -m pip install --quiet --target .venv/flwr-overlay -r benchmarks/requirements-bench.txt
    echo "$bench_hash" > "$STAMPS/bench"
  fi
fi

echo "setup.sh: ready (.venv, node_modules, chromium)"
