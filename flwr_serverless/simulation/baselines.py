"""A disk cache of baseline results (``simulate --baseline-cache``): each baseline is trained once.

A standalone baseline depends on the data, the seed, the partition, the epochs
and the model; the centralized one on the same minus the partition (so the
number of nodes and the skew do not change it). The key is exactly those
settings, written next to the rows as JSON (never pickle): a changed setting
is a different file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import SimulationConfig

FORMAT = 1


def _common(config: SimulationConfig) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "seed": config.seed,
        "max_train_examples": config.max_train_examples,
        "epochs": config.epochs,
        "model": {
            "framework": config.framework,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
        },
        "time_budget": config.heterogeneity.time_budget,
        "evaluation": {
            "eval_each_epoch": config.evaluation.eval_each_epoch,
            "eval_examples": config.evaluation.eval_examples,
        },
    }


def centralized_key(config: SimulationConfig) -> dict[str, Any]:
    """What the centralized baseline depends on: not the number of nodes, the skew or slow nodes."""
    return {"kind": "centralized", **_common(config)}


def standalone_key(config: SimulationConfig) -> dict[str, Any]:
    """What the standalone baselines depend on: the centralized key plus the partition and slow nodes."""
    return {
        "kind": "standalone",
        **_common(config),
        "partition": {
            "num_nodes": config.num_nodes,
            "skew": config.skew,
            **({} if config.partitioning.key() is None else {"partitioner": config.partitioning.key()}),
        },
        "slowdown": list(config.heterogeneity.slowdown),
        "batch_seconds": config.heterogeneity.batch_seconds,
    }


class BaselineCache:
    """Rows (plain dicts) by key, one JSON file per key under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{key['kind']}-{digest}.json"

    def load(self, key: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The cached rows, or None if absent, unreadable or stored under another key."""
        try:
            data = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("rows"), list):
            return None
        return data["rows"]

    def save(self, key: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """Write atomically; rows with an error are never cached (the next run retries them)."""
        if any(row.get("error") for row in rows):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"key": key, "rows": rows}, fh)
        os.replace(tmp, self.path(key))
