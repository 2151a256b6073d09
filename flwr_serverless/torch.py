"""Federate a plain PyTorch training loop: one call per epoch (or period).

    from flwr_serverless.torch import federate

    for epoch in range(epochs):
        train_one_epoch(model)                      # your loop
        figures = federate(node, model, num_examples=len(train_set), metrics={"loss": loss}, epoch=epoch)

The call publishes the module's tensors, aggregates with the peers as the node's mode
says and loads the result into the module in place; it returns the federated figures
(``loss_fed``: the peers' example-weighted mean, plus what ``evaluate`` returns for the
federated model). It runs the same sequence as the Keras, Lightning and Transformers
callbacks (``callbacks/core.py``). Under ``torch.distributed`` only rank 0 talks to the
store and every rank gets the result. Imports torch; ``import flwr_serverless`` does not.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flwr_serverless.callbacks.core import FederatedCallbackCore, Payload
from flwr_serverless.callbacks.torch_state import TorchTensors, native_bf16, on_main_process
from flwr_serverless.validation import check_positive_int

__all__ = ["TorchFederation", "federate"]

EvaluateFn = Callable[[torch.nn.Module], Mapping[str, Any]]


class TorchFederation(FederatedCallbackCore):
    """The state ``federate`` keeps per (node, module): tensor selection, counters, checkpoint tags.

    Use it directly to keep options in one place (``fed = TorchFederation(node, model, trainable_only=True)``,
    then ``fed(num_examples=..., metrics=...)`` per epoch). ``trainable_only`` (default: True for PEFT
    models) federates only the parameters with ``requires_grad``; ``include_buffers`` adds float buffers.
    ``evaluate(module)`` returns figures of the federated model, logged as ``<name><postfix>``.
    """

    framework = "torch"
    model_suffix = ".pt"
    store_model_suffix = None  # torch.save is a pickle: it never goes into a shared store

    def __init__(
        self,
        node: Any,
        module: torch.nn.Module,
        *,
        include_buffers: bool = True,
        trainable_only: bool | None = None,
        evaluate: EvaluateFn | None = None,
        postfix_for_federated_metrics: str = "_fed",
        override_metrics_with_aggregated_metrics: bool = False,
        save_model_before_aggregation: bool = False,
        save_model_after_aggregation: bool = False,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
    ) -> None:
        self._init_core(
            node,
            None,
            0.0,
            postfix_for_federated_metrics,
            override_metrics_with_aggregated_metrics,
            save_model_before_aggregation,
            save_model_after_aggregation,
            checkpoint_dir,
            leave_on_train_end=False,
        )
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be a callable taking the module, got {type(evaluate).__name__}")
        self.tensors = TorchTensors(module, include_buffers, trainable_only, native_bf16(node))
        self.module = module
        self.evaluate = evaluate
        self._examples = 0
        self._steps: int | None = None
        self._fixed_options: dict[str, Any] = {}  # what ``federate()`` was first called with

    def __call__(
        self,
        num_examples: int,
        metrics: Mapping[str, Any] | None = None,
        epoch: int | None = None,
        num_steps: int | None = None,
    ) -> dict[str, float]:
        """Federate now; returns the figures logged (``<name><postfix>`` -> value)."""
        self._examples = check_positive_int("num_examples", num_examples)
        self._steps = check_positive_int("num_steps", num_steps, none=True)
        self._batches = 1  # the core resets it; a call always has something to federate
        if epoch is None:
            epoch = self._node.state_dict().get("federations", 0)
        return self._federate(int(epoch), metrics)

    # -- the framework half of the core ----------------------------------------------
    def _get_arrays(self) -> list[np.ndarray]:
        return self.tensors.get_arrays()

    def _tensor_names(self) -> list[str]:
        return self.tensors.names()

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        self.tensors.set_arrays(arrays)

    def _named_trainables(self) -> Iterable[tuple[str, Any]]:
        return []  # FedProx needs the optimizer step: the custom loop owns it

    def _count_examples(self) -> int:
        examples, self._examples = self._examples, 0
        return examples

    def _optimizer_steps(self) -> int:
        return self._steps if self._steps is not None else 0

    def _is_rank_zero(self) -> bool:
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _on_rank_zero(self, exchange: Callable[[], Payload]) -> Payload:
        return on_main_process(exchange)

    def _save_model(self, path: Path) -> None:
        torch.save(self.module.state_dict(), path)

    def _evaluate(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        from flwr_serverless.callbacks.parts import numeric_metrics

        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                return numeric_metrics(self.evaluate(self.module), suffix=None)
        finally:
            self.module.train(was_training)


_FEDERATIONS: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, TorchFederation]] = weakref.WeakKeyDictionary()


def federate(
    node: Any,
    module: torch.nn.Module,
    num_examples: int,
    metrics: Mapping[str, Any] | None = None,
    epoch: int | None = None,
    *,
    num_steps: int | None = None,
    **options: Any,
) -> dict[str, float]:
    """Publish ``module``'s tensors through ``node``, aggregate, load the result into ``module``.

    ``num_examples`` weighs this node; ``metrics`` (scalars) are averaged over the peers and come back
    as ``<name>_fed``; ``num_steps`` (optimizer steps since the last call) feeds step-based staleness.
    ``options`` are ``TorchFederation``'s (``trainable_only``, ``include_buffers``, ``evaluate``, ...),
    set at the first call for a (node, module) pair; later calls may pass a new ``evaluate`` (a fresh
    lambda each epoch is fine) but not change another option. Returns the federated figures.
    """
    per_node = _FEDERATIONS.setdefault(module, {})
    federation = per_node.get(id(node))
    fixed = {name: value for name, value in options.items() if name != "evaluate"}
    if federation is None or federation.node is not node:
        federation = per_node[id(node)] = TorchFederation(node, module, **options)
        federation._fixed_options = fixed
    else:
        changed = sorted(
            k
            for k in fixed.keys() | federation._fixed_options.keys()
            if fixed.get(k) != federation._fixed_options.get(k)
        )
        if changed:
            raise ValueError(
                f"federate(): {', '.join(changed)} changed since the first call for this node and module; "
                "options are fixed then (use TorchFederation for another configuration)"
            )
        if "evaluate" in options:
            federation.evaluate = options["evaluate"]
    return federation(num_examples, metrics, epoch, num_steps)
