"""Typed options of a simulation, each validated before any training, with errors naming the option.

They replace an untyped dict whose keys were read (or silently not read) deep
inside the workers. Every option names the CLI flag that sets it, so an error
points at what the user typed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from flwr_serverless.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_positive,
    check_positive_int,
)

STALENESS_UNITS = ("steps", "versions")
#: what ``strategies.make_strategy`` gives Flower's FedProx when no mu is set
FEDPROX_DEFAULT_MU = 0.01
PROXIMAL_MU_NOTE = (
    "Flower's FedProx sends mu to clients only in configure_fit, which serverless nodes never call; "
    "the training callback applies the proximal term instead"
)


def option_name(option: str, flag: str | None) -> str:
    """How an error names an option: ``option alpha (--alpha)``."""
    return f"option {option}" + (f" ({flag})" if flag else "")


def _error(option: str, flag: str | None, problem: str) -> ValueError:
    return ValueError(f"{option_name(option, flag)} {problem}")


def _changed(options: Any) -> list[str]:
    """The fields of a dataclass instance that differ from their defaults."""
    default = type(options)()
    return [f.name for f in fields(options) if getattr(options, f.name) != getattr(default, f.name)]


@dataclass(frozen=True)
class AsyncOptions:
    """``AsyncFederatedNode``'s policy: staleness weighting (FedRec/FedAsync), mixing, FedBuff, sampling."""

    staleness: str | None = None  # "constant", "poly:a" or "hinge:a,b" (flwr_serverless.modes.staleness)
    staleness_unit: str = "steps"  # "steps" (FedRec) or "versions" (FedAsync)
    alpha: float | None = None  # FedAsync mixing weight in (0, 1]
    buffer_size: int | None = None  # FedBuff: aggregate after K new peer updates
    participation: float | None = None  # federate with probability C

    FLAGS = {
        "staleness": "--staleness",
        "staleness_unit": "--staleness-unit",
        "alpha": "--alpha",
        "buffer_size": "--buffer-size",
        "participation": "--participation",
    }

    def validate(self) -> None:
        from flwr_serverless.modes.staleness import parse_staleness

        if self.staleness is not None:
            try:
                parse_staleness(self.staleness)
            except ValueError as exc:
                raise _error("staleness", "--staleness", f"is invalid: {exc}") from None
        check_choice(option_name("staleness_unit", "--staleness-unit"), self.staleness_unit, STALENESS_UNITS)
        check_fraction(option_name("alpha", "--alpha"), self.alpha, none=True)
        check_fraction(option_name("participation", "--participation"), self.participation, none=True)
        check_positive_int(option_name("buffer_size", "--buffer-size"), self.buffer_size, none=True)

    def node_kwargs(self, seed: int, index: int) -> dict[str, Any]:
        """Keyword arguments of ``AsyncFederatedNode`` (each node samples participation with its own seed)."""
        kwargs: dict[str, Any] = {"staleness_unit": self.staleness_unit}
        for name in ("staleness", "alpha", "buffer_size", "participation"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.participation is not None:
            kwargs["seed"] = seed * 7919 + index
        return kwargs


@dataclass(frozen=True)
class SemiSyncOptions:
    """``SemiSyncFederatedNode``'s planning: round length ``lambda_`` x the slowest epoch, re-measured or not."""

    lambda_: float = 2.0
    reestimate: bool = True

    FLAGS = {"lambda_": "--lambda", "reestimate": "--no-reestimate"}

    def validate(self) -> None:
        check_positive(option_name("lambda_", "--lambda"), self.lambda_)
        check_bool(option_name("reestimate", "--no-reestimate"), self.reestimate)


@dataclass(frozen=True)
class Heterogeneity:
    """Emulated slow machines and a wall-clock budget, the same for every mode."""

    slowdown: tuple[float, ...] = ()  # node k's batches take slowdown[k] times as long (missing: 1)
    batch_seconds: float | None = None  # pad each batch to factor x this many seconds of wall time
    time_budget: float | None = None  # stop every node's training after this many seconds

    FLAGS = {"slowdown": "--slowdown", "batch_seconds": "--batch-seconds", "time_budget": "--time-budget"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "slowdown", tuple(float(f) for f in self.slowdown))  # a list from JSON or the CLI

    def validate(self, num_nodes: int) -> None:
        bad = [f for f in self.slowdown if not (f >= 1 and math.isfinite(f))]
        if bad:
            raise _error("slowdown", "--slowdown", f"factors must be >= 1, got {list(self.slowdown)}")
        if len(self.slowdown) > num_nodes:
            raise _error(
                "slowdown",
                "--slowdown",
                f"has {len(self.slowdown)} factors for {num_nodes} nodes; give at most one per node",
            )
        check_positive(option_name("batch_seconds", "--batch-seconds"), self.batch_seconds, unit="seconds", none=True)
        check_positive(option_name("time_budget", "--time-budget"), self.time_budget, unit="seconds", none=True)

    def factor(self, index: int, role: str) -> float:
        """Node ``index``'s slowdown; the centralized baseline is never slowed."""
        if role == "centralized" or index >= len(self.slowdown):
            return 1.0
        return float(self.slowdown[index])


@dataclass(frozen=True)
class Evaluation:
    """What is measured during training, beyond the final test accuracy (always on the whole test set)."""

    eval_each_epoch: bool = False  # test the federated model after each federation (test_accuracy, time)
    eval_examples: int | None = None  # those tests use the first N test examples (None: all)

    FLAGS = {"eval_each_epoch": "--eval-each-epoch", "eval_examples": "--eval-examples"}

    def validate(self) -> None:
        check_bool(option_name("eval_each_epoch", "--eval-each-epoch"), self.eval_each_epoch)
        if self.eval_examples is not None:
            check_positive_int(option_name("eval_examples", "--eval-examples"), self.eval_examples)
            if not self.eval_each_epoch:
                raise _error("eval_examples", "--eval-examples", "needs --eval-each-epoch (eval_each_epoch=True)")


ENGINES = ("local", "ray")
#: modes whose nodes never wait for each other (no --timeout, --min-nodes)
NON_WAITING_MODES = ("async", "aggregate")


def check_execution(
    engine: str, address: str | None, use_processes: bool, workers: int | None, store_url: str | None
) -> None:
    """Where nodes run: threads or a process pool here (``local``), or Ray tasks on a cluster (``ray``)."""
    check_choice(option_name("engine", "--engine"), engine, ENGINES)
    check_positive_int(option_name("workers", "--workers"), workers, none=True)
    if workers is not None and not use_processes and engine != "ray":
        raise _error(
            "workers", "--workers", "groups nodes into K processes or Ray tasks: it needs --processes or --engine ray"
        )
    if engine == "ray":
        if use_processes:
            raise _error("use_processes", "--processes", "does not apply to --engine ray: Ray places the nodes")
        if store_url is None or store_url.startswith("memory://"):
            raise _error(
                "store_url",
                "--store",
                "must be a URL every Ray worker reaches (s3://..., or file:// "
                "on a one-machine cluster) with --engine ray, not a default temp folder or memory://",
            )
    elif address is not None:
        raise _error("ray_address", "--address", "applies to --engine ray only")


def check_mode(mode: str, async_options: AsyncOptions, semisync: SemiSyncOptions) -> None:
    """Options of one mode given with another would silently do nothing: refuse them."""
    for options, wanted in ((async_options, "async"), (semisync, "semisync")):
        changed = _changed(options)
        if changed and mode != wanted:
            name = changed[0]
            raise _error(name, type(options).FLAGS[name], f"applies to --mode {wanted} only, not {mode}")


def check_mode_flags(mode: str, async_given: Iterable[str], semisync_given: Iterable[str]) -> None:
    """Flags the user typed for another mode, even at their default value (``check_mode`` cannot see those)."""
    for names, options, wanted in ((async_given, AsyncOptions, "async"), (semisync_given, SemiSyncOptions, "semisync")):
        for name in names:
            if mode != wanted:
                raise _error(name, options.FLAGS[name], f"applies to --mode {wanted} only, not {mode}")


def strategy_key(name: str) -> str:
    """``"FedAvg-M"`` -> ``"fedavgm"``: the spelling ``make_strategy`` accepts."""
    return name.lower().replace("-", "").replace("_", "")


def check_strategy(name: str, options: dict[str, Any]) -> None:
    """Build the strategy once on dummy weights: an unknown name, option or value fails here, not mid-run."""
    import inspect

    import numpy as np

    from flwr_serverless.strategy.factory import make_strategy

    if "proximal_mu" in options:
        raise _error(
            "proximal_mu",
            "--strategy-option",
            f"is not a strategy option here: {PROXIMAL_MU_NOTE}. Set proximal_mu= (CLI: --proximal-mu)",
        )
    dummy = [np.zeros(1, np.float32)]
    try:
        make_strategy(name, initial_parameters=dummy, **options)
    except TypeError as exc:
        accepted = set(inspect.signature(type(make_strategy(name, initial_parameters=dummy))).parameters)
        unknown = [k for k in options if k not in accepted] or list(options)
        raise _error(", ".join(unknown), "--strategy-option", f"is not accepted by {name}: {exc}") from None


def parse_factors(text: str) -> list[float]:
    """``"1,1,4"`` -> [1.0, 1.0, 4.0]; every factor must be >= 1."""
    try:
        factors = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"slowdown factors must be numbers, got {text!r}") from None
    if any(not f >= 1 for f in factors):
        raise ValueError(f"slowdown factors must be >= 1, got {text!r}")
    return factors


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"1,3,7"`` -> [1, 3, 7]; ranges and lists combine (``"0-2,9"``)."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, sep, last = part.partition("-")
            seeds.extend(range(int(first), int(last) + 1) if sep else [int(first)])
    except ValueError:
        raise ValueError(f"seeds must look like 0-4 or 1,3,7, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list without repeats, got {text!r}")
    return seeds
