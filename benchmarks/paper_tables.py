"""Regenerate the paper tables and plots: the same as ``flwr-serverless experiment paper``.

    python benchmarks/paper_tables.py [--quick] [--dataset digits|fashion_mnist] [--tables table1,table2,hetero]

The grid, the strategy settings and the claims checked are in
``flwr_serverless/simulation/paper.py`` (and ``paper_report.py``, ``paper_claims.py``);
outputs go to benchmarks/results/paper_<grid>.{json,csv,md} and PNGs.
"""

from __future__ import annotations

import sys

from flwr_serverless.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "paper", *sys.argv[1:]]))
