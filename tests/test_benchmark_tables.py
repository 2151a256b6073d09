"""The shaped benchmarks' Markdown tables are rendered from their results files (docs never type numbers)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import aggregate_mode
import store_overhead


def _row(mode: str, nodes: int, **extra: float) -> dict:
    return {
        "mode": mode,
        "nodes": nodes,
        "epoch_seconds": 10.0,
        "epochs": 4,
        "requests_mean": 5.25,
        "requests_max": 7,
        "models_down_mean": 1.5,
        "models_down_max": 2.0,
        "seconds_median": 0.8,
        "seconds_p95": 1.7,
        **extra,
    }


def test_aggregate_mode_table_has_one_line_per_row() -> None:
    results = {
        "setup": {"epochs": 4},
        "sweep": [
            _row("all-peers", 5, load_average_before=[12.5, 9.0, 4.0]),
            _row(
                "aggregate",
                5,
                conflict_rate=0.4,
                lost_all_attempts=2,
                folded_by_helper=1,
                deferred_epochs=3,
                node_epochs_all=20,
                members_in_table=4,
                members_latest_folded=3,
            ),
        ],
        "contention": [],
    }
    lines = aggregate_mode.markdown_table(results).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| mode | N |")
    assert lines[2] == (
        "| all-peers (10 s epochs) | 5 | 4 | 5.25 (7) | 1.50 (2.00) | 0.800, 1.700 | 0.00 | - | - | - | - | 12.5 |"
    )
    assert lines[3].endswith("| 0.40 | 2 | 1 | 3 of 20 | 4 of 5 (3) | - |")


def test_store_overhead_table_shows_both_floors_and_load() -> None:
    result = {
        "server": "seaweedfs",
        "latency_ms": 20.0,
        "bandwidth_mbps_per_stream": 100.0,
        "backend": "boto3",
        "model_mb": 40.0,
        "nodes": 5,
        "federation_s_median": 4.8,
        "floor_s_median": 9.6,
        "ratio": 0.5,
        "parallel_floor_s_median": 4.0,
        "ratio_vs_parallel_floor": 1.2,
        "requests_per_node_epoch": 6.0,
        "load_average_end": [14.19, 12.96, 7.49],
    }
    old = {k: v for k, v in result.items() if "parallel" not in k and k not in ("server", "load_average_end")}
    old.update(latency_ms=0.0, bandwidth_mbps_per_stream=0.0)
    lines = store_overhead.markdown_table([result, old]).splitlines()
    assert lines[2] == (
        "| seaweedfs | 20 ms/request, 100 MB/s/stream | boto3 | 40 | 5 | 4.800 | 9.600 | 0.50 | 4.000 | 1.20 | 6 "
        "| 14.19, 12.96, 7.49 |"
    )
    assert lines[3].startswith("| moto | none | boto3 |")  # an older results file: no server, floor or load
    assert lines[3].endswith("| 0.50 | - | - | 6 | - |")
