#!/usr/bin/env bash
# One-time, idempotent set-up of a machine for crossdistil (safe to run again: it only does what is missing).
#   * checks Python >= 3.11 and Java >= 17 (Kafka 4.x needs it), with a clear message when either is missing;
#   * installs torch once per machine into the base interpreter (a CUDA build of a few GB from PyPI; runs on CPU),
#     so every clone's virtual environment reuses it instead of downloading it again;
#   * creates .venv (with access to the base site-packages) and installs the project and its dev tools into it;
#   * resolves the Kafka broker jars from Maven Central into a cache (deploy/kafka/fetch.sh);
#   * installs Prometheus (promtool included) and docker-compose from Debian's packages when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.15.0"}

say() { printf '[setup] %s\n' "$*" >&2; }

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
  say "Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1 || echo none)). Set PYTHON=/path/to/python3.11."
  exit 1
fi
if ! command -v java >/dev/null 2>&1; then
  say "Java 17 or newer is required to run the local Kafka broker. Install it, e.g. 'apt-get install -y openjdk-17-jre-headless'."
  exit 1
fi
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
if [ -n "$java_major" ] && [ "$java_major" -lt 17 ]; then
  say "Java $java_major found; Kafka 4.x needs Java 17 or newer."
  exit 1
fi

# torch: once per machine, in the base interpreter.
if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
  say "installing $TORCH_SPEC into $("$PYTHON" -c 'import sys; print(sys.prefix)') (a few GB, once per machine)"
  "$PYTHON" -m pip install --quiet "$TORCH_SPEC"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PYTHON" -m venv --system-site-packages .venv
fi
say "installing crossdistil into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,peers]'

say "resolving the Kafka broker jars (cached after the first run)"
bash deploy/kafka/fetch.sh >/dev/null

# Debian packages for the tests that check deploy/ for real: Prometheus with promtool (rules, live scrape) and a
# compose implementation (validates deploy/docker-compose.yml; no Docker engine is needed for 'config').
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
{ command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; } || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing ${missing[*]} from Debian's packages"
    (apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; }) \
      || say "could not install ${missing[*]}; the tests that need them will be skipped with a message"
  else
    say "missing ${missing[*]} (Debian packages); the tests that need them will be skipped with a message"
  fi
fi
say "ready: .venv/bin/crossdistil --help"
