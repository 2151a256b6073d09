"""PyTorch Lightning glue: federate a LightningModule's weights at the end of every training epoch.

A Callback subclass must come from the same package as the Trainer, so this
module builds the callback on ``lightning.pytorch`` when it is installed and on
``pytorch_lightning`` otherwise. ``FlwrFederatedCallback`` is the class for
that package; ``make_callback_class(package)`` builds it for the other one.
torch and Lightning are imported only here, never by ``import flwr_serverless``.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch

from flwr_serverless.semisync import record_batch_time, step_budget

__all__ = ["FlwrFederatedCallback", "make_callback_class"]


def _lightning_package() -> ModuleType:
    """``lightning.pytorch`` when installed (the current name), else the standalone ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return importlib.import_module("pytorch_lightning")


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite scalar metrics, minus our own ``_fed`` echoes (re-averaging them would be meaningless)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if str(key).endswith("_fed") or isinstance(value, bool):
            continue
        try:
            number = float(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
        except (TypeError, ValueError, RuntimeError):
            continue
        if math.isfinite(number):
            out[str(key)] = number
    return out


def _batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor (or array) in a batch of any nesting."""
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return int(batch.shape[0]) if batch.ndim > 0 else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


def make_callback_class(package: ModuleType) -> type:
    """Build ``FlwrFederatedCallback`` on ``package.Callback`` (``lightning.pytorch`` or ``pytorch_lightning``)."""

    class FlwrFederatedCallback(package.Callback):  # type: ignore[name-defined,misc]
        """After each training epoch: push weights, pull and aggregate peers', continue from the result.

        ``node`` is an ``AsyncFederatedNode`` or ``SyncFederatedNode``.
        ``num_examples_per_epoch`` weights this node; ``None`` counts the
        examples actually trained (leading dimension of each batch, summed
        over DDP ranks). ``include_buffers`` also federates float buffers
        (BatchNorm running statistics); integer buffers such as
        ``num_batches_tracked`` stay local. ``proximal_mu > 0`` adds FedProx's
        proximal pull towards the last federated weights after every
        optimizer step. Only global rank zero talks to the store; the result
        is broadcast so DDP replicas stay identical. The node's identity and
        round are saved in Lightning checkpoints, so ``fit(ckpt_path=...)``
        rejoins as the same node. With a ``SemiSyncFederatedNode`` the
        callback times every batch and, once the node has planned, federates
        after the node's step budget instead of at epoch end (rank zero plans;
        the budget is broadcast with the weights, so all ranks count alike).
        """

        def __init__(
            self,
            node: Any,
            num_examples_per_epoch: int | None = None,
            include_buffers: bool = True,
            proximal_mu: float = 0.0,
            log_metrics: bool = True,
        ) -> None:
            super().__init__()
            if num_examples_per_epoch is not None and int(num_examples_per_epoch) <= 0:
                raise ValueError(f"num_examples_per_epoch must be positive, got {num_examples_per_epoch}")
            if proximal_mu < 0:
                raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
            self.node = node
            self.num_examples_per_epoch = None if num_examples_per_epoch is None else int(num_examples_per_epoch)
            self.include_buffers = include_buffers
            self.proximal_mu = float(proximal_mu)
            self.log_metrics = log_metrics
            #: Aggregated metrics of the most recent federation (without the ``_fed`` suffix).
            self.last_federated_metrics: dict[str, float] = {}
            self._examples = 0  # since the last federation
            self._start_step = 0  # trainer.global_step at the last federation
            self._batches = 0  # batches since the last federation
            self._budget: int | None = None  # semi-sync: federate after this many batches (None: epoch end)
            self._batch_started: float | None = None
            self._prox_step = -1
            self._anchor: dict[str, torch.Tensor] = {}  # FedProx: last federated parameter values

        # -- what is federated ---------------------------------------------
        def federated_names(self, module: torch.nn.Module) -> list[str]:
            """State-dict keys sent to the store: parameters, plus float buffers when ``include_buffers``."""
            params = {name for name, _ in module.named_parameters()}
            names = []
            for name, tensor in module.state_dict().items():
                if not torch.is_floating_point(tensor):
                    continue  # step counters are local bookkeeping, never averaged
                if name in params or self.include_buffers:
                    names.append(name)
            return names

        @staticmethod
        def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
            tensor = tensor.detach()
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; restored to bf16 on load
                tensor = tensor.float()
            return tensor.cpu().numpy().copy()

        # -- FedProx --------------------------------------------------------
        def _set_anchor(self, module: torch.nn.Module) -> None:
            if self.proximal_mu > 0:
                self._anchor = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

        @torch.no_grad()
        def _proximal_step(self, trainer: Any, module: torch.nn.Module) -> None:
            """w <- w - lr * mu * (w - w_fed) for every parameter an optimizer just stepped."""
            names = {id(p): n for n, p in module.named_parameters()}
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    factor = float(group["lr"]) * self.proximal_mu
                    for param in group["params"]:
                        anchor = self._anchor.get(names.get(id(param), ""))
                        if anchor is not None:
                            param.sub_(factor * (param - anchor))

        # -- Lightning hooks --------------------------------------------------
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._set_anchor(pl_module)  # initial (or restored, already federated) weights
            self._prox_step = trainer.global_step

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if self._budget is None:  # epoch-end federation: count this epoch only
                self._examples = 0
                self._batches = 0
                self._start_step = trainer.global_step

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._batch_started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._examples += _batch_size(batch)
            self._batches += 1
            # global_step counts optimizer steps: with gradient accumulation not every batch steps.
            if self.proximal_mu > 0 and trainer.global_step != self._prox_step:
                self._prox_step = trainer.global_step
                self._proximal_step(trainer, pl_module)
            if self._batch_started is not None and trainer.is_global_zero:
                record_batch_time(self.node, time.perf_counter() - self._batch_started)
            if self._budget is not None and self._batches >= self._budget:
                self._federate(trainer, pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self._budget is None:
                self._federate(trainer, pl_module)

        def _federate(self, trainer: Any, pl_module: Any) -> None:
            """Push, pull, aggregate on rank zero; every rank loads the result (and the next step budget)."""
            strategy = trainer.strategy
            examples = self._examples
            if self.num_examples_per_epoch is None and trainer.world_size > 1:
                examples = int(strategy.reduce(torch.tensor(float(examples), device=pl_module.device),
                                               reduce_op="sum").item())
            num_examples = self.num_examples_per_epoch if self.num_examples_per_epoch is not None else examples
            names = self.federated_names(pl_module)
            state = pl_module.state_dict()
            payload: tuple[list[np.ndarray], dict[str, float], int | None] | None = None
            if trainer.is_global_zero:
                arrays = [self._to_numpy(state[n]) for n in names]
                new_arrays, aggregated = self.node.update_parameters(
                    arrays, num_examples, epoch=trainer.current_epoch,
                    metrics=_numeric_metrics(trainer.callback_metrics),
                    num_steps=trainer.global_step - self._start_step,
                )
                payload = ([np.asarray(a) for a in new_arrays], dict(aggregated or {}), step_budget(self.node))
            if trainer.world_size > 1:
                payload = strategy.broadcast(payload, src=0)
            assert payload is not None
            new_arrays, aggregated, self._budget = payload
            self._examples = 0
            self._batches = 0
            self._start_step = trainer.global_step
            with torch.no_grad():
                for name, array in zip(names, new_arrays):
                    # copy_ keeps the tensor's dtype and device; np.require copies read-only arrays only
                    state[name].copy_(torch.from_numpy(np.require(array, requirements=["C", "W"])))
            self._set_anchor(pl_module)
            self.last_federated_metrics = aggregated
            if self.log_metrics:
                for key, value in aggregated.items():
                    pl_module.log(f"{key}_fed", float(value), prog_bar=True, on_epoch=True, sync_dist=False)

        # -- resume -------------------------------------------------------------
        def state_dict(self) -> dict[str, Any]:
            """Saved in every checkpoint: the node's identity, counters and (sync) round."""
            state = getattr(self.node, "state_dict", None)
            return {"node": state() if callable(state) else {}}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            load = getattr(self.node, "load_state_dict", None)
            if callable(load) and state_dict.get("node"):
                load(state_dict["node"])

    FlwrFederatedCallback.__module__ = __name__
    FlwrFederatedCallback.__qualname__ = "FlwrFederatedCallback"  # the key of its state in checkpoints
    return FlwrFederatedCallback


#: The callback for the installed Lightning package (``lightning.pytorch`` if present).
FlwrFederatedCallback: Any = make_callback_class(_lightning_package())
