#!/usr/bin/env bash
# Creates .venv with raypurify and its stack, idempotently. Sourced by the
# README's two commands. torch is installed first and pinned, so that on a
# machine without a GPU pip takes the local CPU wheel instead of a CUDA build
# of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.raypurify-installed"
want="$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch (pinned CPU wheel) and raypurify into .venv (about 2 minutes the first time)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c scripts/constraints.txt torch
  .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
# WordNet for the `wordnet` evidence provider. No PyPI package ships the
# database; Debian's wordnet-base and wordnet-sense-index do. On Debian/Ubuntu
# they are installed with apt-get when missing (root, or sudo), then copied
# into .venv/nltk_data with the `lexnames` file nltk needs (skipped once
# there). On other systems nothing is installed: get WordNet 3.0's dict files
# and run .venv/bin/python -c "from raypurify.evidence import prepare_wordnet;
# prepare_wordnet('/path/to/dict')"; everything else works without it.
if [ ! -f .venv/nltk_data/corpora/wordnet/lexnames ]; then
  if [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/wordnet/index.sense ]; then
    if command -v apt-get >/dev/null 2>&1; then
      sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
      echo "[setup] installing WordNet data (Debian packages wordnet-base, wordnet-sense-index)" >&2
      { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
          --no-install-recommends wordnet-base wordnet-sense-index; } >/dev/null \
        || echo "[setup] warning: apt-get could not install WordNet; the 'wordnet' evidence provider is unavailable" >&2
    else
      echo "[setup] no apt-get here: WordNet not installed; the 'wordnet' evidence provider is unavailable" >&2
    fi
  fi
  if [ -f /usr/share/wordnet/data.noun ]; then
    .venv/bin/python -c "from raypurify.evidence import prepare_wordnet; print('[setup] WordNet data in', prepare_wordnet())" >&2
  fi
fi
