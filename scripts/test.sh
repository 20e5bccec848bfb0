#!/usr/bin/env bash
# The README's second command: install runm with its test tools and run the whole suite.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
scripts/install.sh --dev
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest --cov=runm --cov-report=term --cov-fail-under=85 "$@"
