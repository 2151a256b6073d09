"""What the Keras and Lightning callbacks share, written once and free of any framework import.

``FederatedCallbackCore`` is a mixin holding the options, the counters between
federations, the federation sequence (checkpoint before, exchange with the node,
load, evaluate, checkpoint after, log) and the end-of-training flush and leave.
Each callback supplies the framework half through a few ``_hook`` methods.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from flwr_serverless.callbacks.parts import (
    ProximalTerm,
    federated_logs,
    numeric_metrics,
    write_atomically,
)
from flwr_serverless.node.protocol import Federating
from flwr_serverless.validation import check_number, check_positive_int
from flwr_serverless.wire import layout

__all__ = ["FederatedCallbackCore", "Payload", "as_federating"]

#: Exchange result every rank loads: (weights, aggregated metrics, the node's next step budget).
Payload = tuple[list[np.ndarray], dict[str, float], int | None]


def as_federating(node: Any) -> Federating:
    """``node`` when it implements the ``Federating`` protocol (every ``FederatedNode`` does), else a TypeError."""
    if not isinstance(node, Federating):
        missing = [
            name
            for name in (
                "update_parameters",
                "steps_until_federation",
                "record_batch_time",
                "leave",
                "state_dict",
                "load_state_dict",
            )
            if not callable(getattr(node, name, None))
        ]
        raise TypeError(
            f"node must be a federated node (the Federating protocol); {type(node).__name__} lacks "
            f"{', '.join(missing) or 'node_id'}"
        )
    return node


class FederatedCallbackCore:
    """The framework-neutral half of ``FlwrFederatedCallback`` (Keras and Lightning).

    Subclasses call ``_init_core`` from ``__init__`` and implement the ``_hook`` methods below.
    """

    framework: ClassVar[str]  # "keras" / "torch": tells the node how to read tensor_names
    model_suffix: ClassVar[str]  # file suffix of a saved model
    store_model_suffix: ClassVar[str | None] = None  # suffix of a model saved into the store (None: never)

    def _init_core(
        self,
        node: Any,
        num_examples_per_epoch: int | None = None,
        proximal_mu: float = 0.0,
        postfix_for_federated_metrics: str = "_fed",
        override_metrics_with_aggregated_metrics: bool = False,
        save_model_before_aggregation: bool = False,
        save_model_after_aggregation: bool = False,
        checkpoint_dir: str | os.PathLike[str] | None = "checkpoints",
        leave_on_train_end: bool = True,
    ) -> None:
        """Validate and keep the options both callbacks take (same names as their keyword arguments)."""
        self._node = as_federating(node)
        self.node = node
        self.num_examples_per_epoch = check_positive_int("num_examples_per_epoch", num_examples_per_epoch, none=True)
        check_number("proximal_mu", proximal_mu, 0.0)
        if not isinstance(postfix_for_federated_metrics, str) or not postfix_for_federated_metrics:
            raise ValueError(
                f"postfix_for_federated_metrics must be a non-empty string, got {postfix_for_federated_metrics!r}"
            )
        #: FedProx: after every optimizer step, w <- w - lr * mu * (w - w_fed). 0 disables it (no extra work).
        self.proximal_mu = float(proximal_mu)
        self._proximal = ProximalTerm(proximal_mu)
        self.postfix_for_federated_metrics = postfix_for_federated_metrics
        self.override_metrics_with_aggregated_metrics = bool(override_metrics_with_aggregated_metrics)
        self.save_model_before_aggregation = bool(save_model_before_aggregation)
        self.save_model_after_aggregation = bool(save_model_after_aggregation)
        #: None: checkpoints go into the node's store under ``keras/<node_id>/`` (the original's place).
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.leave_on_train_end = bool(leave_on_train_end)
        #: Aggregated metrics of the most recent federation (the participants' mean, without the suffix).
        self.last_federated_metrics: dict[str, float] = {}
        #: The federated model's figures on the evaluation data after the most recent federation ({} without it).
        self.last_evaluation: dict[str, float] = {}
        self._budget: int | None = None  # semi-sync: federate after this many batches (None: at epoch end)
        self._batches = 0  # batches trained since the last federation
        self._batch_started: float | None = None
        self._checkpoints_in_epoch: dict[int, int] = {}
        self._left = False

    @property
    def federated_metrics(self) -> dict[str, float]:
        """The original flwr-serverless name for ``last_federated_metrics``."""
        return self.last_federated_metrics

    # -- framework half -------------------------------------------------------------
    def _get_arrays(self) -> list[np.ndarray]:
        raise NotImplementedError

    def _tensor_names(self) -> list[str]:
        raise NotImplementedError

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        raise NotImplementedError

    def _named_trainables(self) -> Iterable[tuple[str, Any]]:
        """(name, value) of the tensors FedProx anchors."""
        raise NotImplementedError

    def _copy_tensor(self, value: Any) -> Any:
        raise NotImplementedError

    def _count_examples(self) -> int:
        """Examples trained since the last federation (all ranks), and start counting anew."""
        raise NotImplementedError

    def _optimizer_steps(self) -> int:
        """Optimizer steps since the last federation (default: batches)."""
        return self._batches

    def _save_model(self, path: Path) -> None:
        raise NotImplementedError

    def _evaluate(self) -> dict[str, float]:
        """The loaded (federated) model's figures on the evaluation data; {} when none was given."""
        return {}

    def _log(self, names_values: dict[str, float], final: bool) -> None:
        """Make the federated figures visible (``final``: from the end-of-training flush)."""

    def _is_rank_zero(self) -> bool:
        return True

    def _on_rank_zero(self, exchange: Callable[[], Payload]) -> Payload:
        """Run ``exchange`` where the store is talked to, and give its result to every rank."""
        return exchange()

    # -- bookkeeping --------------------------------------------------------------------
    def _start_training(self) -> None:
        self._batches = 0
        self._left = False
        self._set_anchor()

    def _batch_begin(self) -> None:
        self._batch_started = time.perf_counter()

    def _batch_end(self) -> None:
        """Count the batch and time it for nodes that plan by batch time (semi-sync)."""
        self._batches += 1
        if self._batch_started is not None and self._is_rank_zero():
            ended = time.perf_counter()
            self._node.record_batch_time(ended - self._batch_started, ended)
        self._batch_started = None

    @property
    def _budget_due(self) -> bool:
        return self._budget is not None and self._batches >= self._budget

    @property
    def pending_batches(self) -> int:
        """Batches trained since the last federation: what the end-of-training flush would federate."""
        return self._batches

    def _set_anchor(self) -> None:
        self._proximal.set_anchor(self._named_trainables(), self._copy_tensor)

    # -- federation ---------------------------------------------------------------------
    def _federate(self, epoch: int, logs: Mapping[str, Any] | None, final: bool = False) -> dict[str, float]:
        """Push, pull and aggregate, load the result; return what was logged (name -> value)."""
        metrics = numeric_metrics(logs, self.postfix_for_federated_metrics)
        counted = self._count_examples()
        num_examples = self.num_examples_per_epoch if self.num_examples_per_epoch is not None else counted
        if num_examples == 0:
            # Weight 0 drops this node's training from the aggregate; say why instead of failing quietly.
            warnings.warn(
                f"FlwrFederatedCallback counted no training examples in epoch {epoch}; if the model "
                "did train, pass num_examples_per_epoch",
                stacklevel=3,
            )
        steps, self._batches = self._optimizer_steps(), 0
        tag = self._checkpoint_tag(epoch)
        if self.save_model_before_aggregation:
            self._write_checkpoint("before", tag, metrics)

        def exchange() -> Payload:
            arrays, aggregated = self._node.update_parameters(
                self._get_arrays(),
                num_examples=num_examples,
                metrics=metrics,
                epoch=epoch,
                num_steps=steps,
                tensor_names=self._tensor_names(),
                framework=self.framework,
            )
            return [np.asarray(a) for a in arrays], dict(aggregated or {}), self._node.steps_until_federation()

        arrays, aggregated, self._budget = self._on_rank_zero(exchange)
        self._set_arrays(arrays)
        self._set_anchor()
        self._after_federation()
        self.last_federated_metrics = aggregated
        self.last_evaluation = self._evaluate()
        figures = {**aggregated, **self.last_evaluation}  # evaluation replaces the peers' mean of the same name
        if self.save_model_after_aggregation:
            self._write_checkpoint("after", tag, figures)
        logged = federated_logs(
            figures, self.postfix_for_federated_metrics, self.override_metrics_with_aggregated_metrics
        )
        self._log(logged, final)
        return logged

    def _after_federation(self) -> None:
        """Called once the federated weights are loaded (Keras saves its state file here)."""

    def _finish_training(self, epoch: int, logs: Mapping[str, Any] | None) -> dict[str, float] | None:
        """Federate what was trained since the last federation (a partial semi-sync budget, say)."""
        return self._federate(epoch, logs, final=True) if self._batches > 0 else None

    def _leave(self) -> None:
        """End the node's membership once per fit (rank zero), unless the user keeps it for another fit."""
        if self.leave_on_train_end and not self._left and self._is_rank_zero():
            self._left = True
            self._node.leave()

    # -- checkpoints and state --------------------------------------------------------
    def _checkpoint_tag(self, epoch: int) -> str:
        """``00003`` for an epoch's first federation, ``00003_1``... for later ones (semi-sync, final flush)."""
        count = self._checkpoints_in_epoch.get(epoch, 0)
        self._checkpoints_in_epoch[epoch] = count + 1
        return f"{epoch:05d}" if count == 0 else f"{epoch:05d}_{count}"

    def _write_checkpoint(self, stage: str, tag: str, metrics: Mapping[str, float]) -> None:
        """``<checkpoint_dir>/<node_id>/model_{stage}_aggregation_<tag><suffix>`` and its metrics JSON."""
        if not self._is_rank_zero():
            return
        model_name = f"model_{stage}_aggregation_{tag}"
        text = json.dumps(dict(metrics), indent=2, sort_keys=True)
        if self.checkpoint_dir is None:
            self._checkpoint_to_store(model_name, f"metrics_{stage}_aggregation_{tag}.json", text)
            return
        folder = self.checkpoint_dir / self._node.node_id
        write_atomically(folder / f"{model_name}{self.model_suffix}", self._save_model)
        write_atomically(
            folder / f"metrics_{stage}_aggregation_{tag}.json", lambda path: path.write_text(text, encoding="utf-8")
        )

    def _checkpoint_to_store(self, model_name: str, metrics_name: str, text: str) -> None:
        """Into the node's store, ``keras/<node_id>/...`` (never a pickle: Keras writes HDF5 here)."""
        store = getattr(self.node, "store", None)
        if store is None or self.store_model_suffix is None:
            raise ValueError(
                "checkpoint_dir=None stores checkpoints in the node's store; this node or framework "
                "has none: pass a checkpoint_dir"
            )
        folder = f"{layout.CHECKPOINTS}{self._node.node_id}/"
        with tempfile.TemporaryDirectory(prefix="flwr-serverless-ckpt-") as scratch:
            path = Path(scratch) / f"{model_name}{self.store_model_suffix}"
            self._save_model(path)
            store.put(folder + path.name, path.read_bytes())
        store.put(folder + metrics_name, text.encode())

    def state_dict(self) -> dict[str, Any]:
        """The node's identity, counters and (sync) round: what a restarted job needs to rejoin."""
        return {"node": self._node.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("node"):
            self._node.load_state_dict(state_dict["node"])

    def _save_state_file(self, path: Path | None) -> None:
        if path is not None:
            text = json.dumps(self._node.state_dict())
            write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))

    def _load_state_file(self, path: Path | None) -> bool:
        if path is None or not path.exists():
            return False
        self._node.load_state_dict(json.loads(path.read_text(encoding="utf-8")))
        return True
