"""Docs renderers for the shaped benchmarks' tables, for the mkdocs hook (docs/_hooks/bench_tables.py).

The hook registers them with ``RENDERERS.update(doc_tables.renderers(load, source_line))``; a page then writes
``<!-- table: aggregate_mode_rows aggregate_mode_shaped -->`` (one results file of aggregate_mode.py) or
``<!-- table: store_overhead_rows shaped -->`` (every ``store_overhead_*shaped*.json``, one row each).
The tables themselves come from each script's ``markdown_table``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aggregate_mode  # noqa: E402
import store_overhead  # noqa: E402


def renderers(load: Callable[[str], Any], source_line: Callable[..., str]) -> dict[str, Callable[[str], str]]:
    """``load(name)`` parses ``benchmarks/results/<name>``; ``source_line(*names)`` says where a table came from."""

    def aggregate_mode_rows(argument: str) -> str:
        name = f"{argument}.json"
        return aggregate_mode.markdown_table(load(name)) + source_line(name)

    def store_overhead_rows(argument: str) -> str:
        names = sorted(path.name for path in (HERE / "results").glob(f"store_overhead_*{argument}*.json"))
        if not names:
            raise FileNotFoundError(f"no benchmarks/results/store_overhead_*{argument}*.json for store_overhead_rows")
        return store_overhead.markdown_table([load(name) for name in names]) + source_line(*names)

    return {"aggregate_mode_rows": aggregate_mode_rows, "store_overhead_rows": store_overhead_rows}
