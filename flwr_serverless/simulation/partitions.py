"""How the training set is split among the nodes: the paper's label skew, or a Flower Datasets partitioner.

``--partitioner`` takes ``skew`` (the default, set by ``--skew``: the flwr-serverless paper's split, which
the paper tables keep), ``iid``, ``dirichlet:ALPHA``, ``pathological:K`` (K classes per node) or
``shard:K`` (K shards per node); ``--partitioner-option KEY=VALUE`` gives the partitioner's other
arguments. Everything is checked before any data is loaded, naming the flag. Flower Datasets partitions a
Hugging Face ``datasets.Dataset``: it gets one holding the labels and each example's index, so the images
stay in their numpy arrays and every node gets index arrays, as with the label skew.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr_serverless.simulation.data import partition_label_skew
from flwr_serverless.simulation.options import option_name
from flwr_serverless.validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_positive_int,
    parse_number,
)

PARTITIONERS = ("skew", "iid", "dirichlet", "pathological", "shard")
#: the argument ``--partitioner KIND:VALUE`` sets
MAIN_ARGUMENT = {"dirichlet": "alpha", "pathological": "num_classes_per_partition", "shard": "num_shards_per_partition"}
CLASS_ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")
_Check = Callable[[str, Any], Any]
#: per partitioner, the arguments a user may set and how each is checked (num_partitions, partition_by and
#: seed come from --nodes, the label column and --seed)
ARGUMENTS: dict[str, dict[str, _Check]] = {
    "skew": {},
    "iid": {},
    "dirichlet": {
        "alpha": check_positive,
        "min_partition_size": lambda name, value: check_int(name, value, 0),
        "self_balancing": check_bool,
    },
    "pathological": {
        "num_classes_per_partition": check_positive_int,
        "class_assignment_mode": lambda name, value: check_choice(name, value, CLASS_ASSIGNMENT_MODES),
    },
    "shard": {
        "num_shards_per_partition": check_positive_int,
        "shard_size": check_positive_int,
        "keep_incomplete_shard": check_bool,
    },
}
REQUIRED = {"dirichlet": "alpha", "pathological": "num_classes_per_partition"}


def _number(text: str) -> int | float | str:
    try:
        return parse_number(text)
    except ValueError:
        return text  # the argument's check says what it needs, naming the flag


@dataclass(frozen=True)
class Partitioning:
    """``spec`` is what ``--partitioner`` took; ``options`` the ``--partitioner-option`` pairs."""

    spec: str = "skew"
    options: dict[str, Any] = field(default_factory=dict)

    FLAGS = {"spec": "--partitioner", "options": "--partitioner-option"}

    @property
    def kind(self) -> str:
        return str(self.spec).partition(":")[0]

    def arguments(self) -> dict[str, Any]:
        """The partitioner's keyword arguments, checked; a ValueError names the flag otherwise."""
        flag = option_name("partitioner", "--partitioner")
        if not isinstance(self.spec, str):
            raise ValueError(f"{flag} must be a string such as iid or dirichlet:0.5, got {self.spec!r}")
        kind, sep, value = self.spec.partition(":")
        check_choice(flag, kind, PARTITIONERS)
        accepted = ARGUMENTS[kind]
        given: dict[str, tuple[Any, str]] = {}
        if sep:
            if kind not in MAIN_ARGUMENT:
                raise ValueError(f"{flag} {kind} takes no parameter, got {self.spec!r}")
            given[MAIN_ARGUMENT[kind]] = (_number(value), flag)
        for key, value in self.options.items():
            where = option_name(key, "--partitioner-option")
            if key not in accepted:
                takes = ", ".join(accepted) if accepted else "no options"
                raise ValueError(f"{where} is not an argument of the {kind} partitioner (it takes {takes})")
            if key in given:
                raise ValueError(f"{where} is already set by --partitioner {self.spec}; set it once")
            given[key] = (value, where)
        if kind in REQUIRED and REQUIRED[kind] not in given:
            raise ValueError(f"{flag} {kind} needs its parameter: {kind}:{REQUIRED[kind].upper()}, e.g. {kind}:2")
        return {key: accepted[key](where, value) for key, (value, where) in given.items()}

    def validate(self, skew: float, default_skew: float) -> None:
        self.arguments()
        if self.kind != "skew" and skew != default_skew:
            raise ValueError(
                f"option skew (--skew) applies to --partitioner skew only, not {self.kind} "
                "(set the split through the partitioner)"
            )

    def split(self, labels: np.ndarray, num_nodes: int, skew: float, seed: int) -> list[np.ndarray]:
        """One index array (into ``labels``) per node."""
        if self.kind == "skew":
            return partition_label_skew(labels, num_nodes, skew, seed)
        return flower_partitions(self.kind, self.arguments(), labels, num_nodes, seed)

    def key(self) -> dict[str, Any] | None:
        """What a cache key needs beyond the skew: nothing for the default split (old keys stay valid)."""
        return None if self.kind == "skew" else {"spec": self.spec, "options": dict(sorted(self.options.items()))}


def flower_partitions(
    kind: str, arguments: dict[str, Any], labels: np.ndarray, num_nodes: int, seed: int
) -> list[np.ndarray]:
    """Split with Flower Datasets' partitioner ``kind``: a Dataset of (label, index) in, index arrays out."""
    try:
        import datasets
        from flwr_datasets import partitioner as flower
    except ImportError as exc:
        raise RuntimeError(f"--partitioner {kind} needs Flower Datasets: pip install flwr-datasets") from exc
    classes = {
        "iid": flower.IidPartitioner,
        "dirichlet": flower.DirichletPartitioner,
        "pathological": flower.PathologicalPartitioner,
        "shard": flower.ShardPartitioner,
    }
    labels = np.asarray(labels).reshape(-1)
    table = datasets.Dataset.from_dict({"label": labels, "index": np.arange(len(labels), dtype=np.int64)})
    table = table.shuffle(seed=seed)  # the IID partitioner cuts contiguous shards: never of a sorted set
    kwargs: dict[str, Any] = {"num_partitions": num_nodes, **arguments}
    if kind != "iid":
        kwargs.update(partition_by="label", seed=seed)
    partitioner = classes[kind](**kwargs)
    partitioner.dataset = table
    try:
        return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(num_nodes)]
    except ValueError as exc:
        raise ValueError(
            f"--partitioner {kind} could not split {len(labels)} examples among {num_nodes} nodes: {exc}"
        ) from None
