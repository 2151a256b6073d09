"""Regenerate the paper tables and plots: the same as ``make paper`` (kept for the old command line).

    python benchmarks/paper_tables.py [--quick] [--dataset digits|fashion_mnist] [--tables table1,table2,hetero]

The harness lives in ``benchmarks/paper/`` (grid, tables, claims, plots, run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paper.run import main

if __name__ == "__main__":
    sys.exit(main())
