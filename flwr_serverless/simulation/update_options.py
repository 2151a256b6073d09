"""What the simulated nodes publish (compression) and what the aggregate mode needs, checked before training.

The compression options are a thin pass-through of the node's own
(``compression=``, ``topk_*=``): the top-k option names are read from the node
and writer signatures, and the values are checked by building the node's
``UpdateWriter``, so the CLI follows the library when those options change.
Errors are re-worded to name the flag the user typed.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TOPK_PREFIX = "topk_"


def topk_option_names() -> tuple[str, ...]:
    """The ``topk_*`` keyword options a node accepts (its constructor and its update writer), in order."""
    from flwr_serverless.node.base import FederatedNode
    from flwr_serverless.node.publisher import UpdateWriter

    names: dict[str, None] = {}
    for function in (FederatedNode.__init__, UpdateWriter.__init__):
        for name, parameter in inspect.signature(function).parameters.items():
            if name.startswith(TOPK_PREFIX) and parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                names[name] = None
    return tuple(names)


def flag_of(option: str) -> str:
    """``topk_keyframe_every`` -> ``--topk-keyframe-every``."""
    return "--" + option.replace("_", "-")


def _error(option: str, problem: str) -> ValueError:
    return ValueError(f"option {option} ({flag_of(option)}) {problem}")


@dataclass(frozen=True)
class CompressionOptions:
    """The node options ``compression`` (None, "fp16", "bf16", "int8", "topk:<fraction>") and ``topk_*``."""

    compression: str | None = None
    topk: dict[str, Any] = field(default_factory=dict)  # {"topk_keyframe_every": 5, ...}: passed through as given

    @classmethod
    def from_node_options(cls, node_options: Mapping[str, Any]) -> CompressionOptions:
        """The compression options found in a ``node_options`` dict (the Python API's older spelling)."""
        return cls(
            node_options.get("compression"), {k: v for k, v in node_options.items() if k.startswith(TOPK_PREFIX)}
        )

    @property
    def given(self) -> bool:
        return self.compression is not None or bool(self.topk)

    def node_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every node class (nothing when no compression option is set)."""
        return {**({"compression": self.compression} if self.compression is not None else {}), **self.topk}

    def validate(self, mode: str) -> None:
        """Build the node's ``UpdateWriter`` once: any value it refuses fails here, naming the flag."""
        from flwr_serverless.node.publisher import UpdateWriter

        known = topk_option_names()
        unknown = [name for name in self.topk if name not in known]
        if unknown:
            raise _error(unknown[0], f"is not a node option here (top-k options: {', '.join(known) or 'none'})")
        try:
            writer = UpdateWriter(self.compression, **self.topk)
        except (ValueError, TypeError) as exc:
            message = str(exc)
            named = [name for name in self.topk if name in message]
            first = min(named, key=message.index) if named else "compression"
            raise _error(first, f"is invalid: {message}") from None
        if mode == "aggregate" and writer.topk is not None:
            raise _error(
                "compression",
                f"{self.compression!r} is not available with --mode aggregate (a "
                "contribution must be subtracted exactly later); use fp16, bf16 or int8",
            )


def check_aggregate(
    strategy: str, strategy_options: Mapping[str, Any], store_url: str | None, storage_options: Mapping[str, Any]
) -> None:
    """``--mode aggregate`` keeps FedAvg in one compare-and-swap object: refuse other strategies and stores
    without conditional writes before any node is built."""
    import numpy as np

    from flwr_serverless.strategy.aggregate import is_linear
    from flwr_serverless.strategy.factory import make_strategy

    built = make_strategy(strategy, initial_parameters=[np.zeros(1, np.float32)], **dict(strategy_options))
    if not is_linear(built):
        raise ValueError(
            f"option strategy (--strategy) {strategy!r} is not available with --mode aggregate: "
            "the aggregate is a weighted mean (FedAvg); use --strategy fedavg or --mode async"
        )
    if not _conditional_writes(store_url, storage_options):
        raise ValueError(
            f"option store_url (--store) {store_url!r} cannot compare-and-swap (no conditional "
            "writes), which --mode aggregate needs: use s3://, a local folder or memory://"
        )


def _conditional_writes(store_url: str | None, storage_options: Mapping[str, Any]) -> bool:
    """Whether the store at ``store_url`` (None: a local temp folder) supports ``put_if_match``."""
    from flwr_serverless.stores import open_store
    from flwr_serverless.stores.local import LocalStore

    if store_url is None:
        return bool(LocalStore.supports_conditional_writes)
    store = open_store(store_url, **dict(storage_options))  # no request is sent: the backend is only built
    try:
        return bool(store.supports_conditional_writes)
    finally:
        store.close()
