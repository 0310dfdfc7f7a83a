"""The operator at scale: `python bench/scale.py [--jobs 1000 --nodes 100 --kills 3]`, or
`make bench-scale`. What it runs and prints: bench/finetune_bench/scale.py; measured results
with the machine: docs/operations.md ("Scale"). Development only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOTS = [str(ROOT / d) for d in ("api", "operator", "dev", "bench")]
sys.path[:0] = ROOTS
# The operator runs as its own process: it must import this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join([*ROOTS, os.environ.get("PYTHONPATH", "")]).rstrip(
    os.pathsep
)

from finetune_bench.scale import main

if __name__ == "__main__":
    sys.exit(main())
