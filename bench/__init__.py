"""runm's benchmark suite: `python -m bench` (see bench/README.md).

Measures this checkout's runm: src/ goes first on sys.path, and on the PYTHONPATH of every
`runm` the bench starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
RESULTS = Path(__file__).resolve().parent / "results"

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
