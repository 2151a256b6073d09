"""PyTorch Lightning glue: federate a LightningModule's weights as it trains.

A Callback subclass must come from the same package as the Trainer:
``FlwrFederatedCallback`` is built on ``lightning.pytorch`` when it is installed
and on ``pytorch_lightning`` otherwise; ``make_callback_class(package)`` gives
the class for the other one. Everything not Lightning-specific lives in
``callbacks/core.py``. torch and Lightning are imported only here, never by
``import flwr_serverless``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from flwr_serverless.callbacks.core import FederatedCallbackCore, Payload
from flwr_serverless.callbacks.parts import RunningMean, check_given_with, leading_dim
from flwr_serverless.callbacks.torch_state import native_bf16, to_numpy, to_torch
from flwr_serverless.validation import check_positive_int

__all__ = ["FlwrFederatedCallback", "make_callback_class"]

#: ``eval_fn(module, batch, batch_idx)`` -> figures of one evaluation batch.
EvalFn = Callable[[Any, Any, int], Mapping[str, Any]]


def _lightning_package() -> ModuleType:
    """``lightning.pytorch`` when installed (the current name), else the standalone ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return importlib.import_module("pytorch_lightning")


@contextmanager
def _captured_logs(module: Any) -> Iterator[dict[str, Any]]:
    """While evaluating, ``self.log``/``self.log_dict`` in the module's ``validation_step`` fill a dict
    instead of the trainer's results (which would mix them with the real validation loop's)."""
    captured: dict[str, Any] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        captured[name] = value

    def log_dict(values: Mapping[str, Any], *args: Any, **kwargs: Any) -> None:
        captured.update(values)

    module.log, module.log_dict = log, log_dict  # instance attributes shadow the methods
    try:
        yield captured
    finally:
        del module.log, module.log_dict


class _LightningFederation(FederatedCallbackCore):
    """The body of ``FlwrFederatedCallback``, independent of which Lightning package's ``Callback`` it extends.

    ``node``: a federated node. ``num_examples_per_epoch`` weights this node; ``None`` counts the
    examples actually trained (leading dimension of each batch, summed over DDP ranks).
    ``include_buffers`` also federates float buffers (BatchNorm running statistics); integer buffers
    such as ``num_batches_tracked`` stay local. ``proximal_mu > 0`` adds FedProx's proximal pull towards
    the last federated weights after every optimizer step. ``log_metrics`` logs the federated figures.

    Evaluation: with ``eval_dataloader`` the federated model is evaluated after every federation (at
    most ``eval_steps`` batches) and each figure is logged as ``<name><postfix>``: what the module's
    ``validation_step`` logs (``val_acc`` -> ``val_acc_fed``, the federated model's accuracy), or what
    ``eval_fn(module, batch, batch_idx)`` returns; batch figures are averaged weighted by batch size.
    Without it, ``<name>_fed`` is the mean of ``<name>`` over the nodes aggregated (their training
    figures); evaluation replaces such a mean of the same name. ``postfix_for_federated_metrics``,
    ``override_metrics_with_aggregated_metrics``, ``save_model_before_aggregation`` and
    ``save_model_after_aggregation`` are as in the Keras callback; models are saved with
    ``torch.save(module.state_dict())`` as ``<checkpoint_dir>/<node_id>/model_*_aggregation_<epoch>.pt``.

    Only global rank zero talks to the store; the result is broadcast so DDP replicas stay identical.
    The node's identity and round are saved in Lightning checkpoints, so ``fit(ckpt_path=...)`` rejoins
    as the same node. With a ``SemiSyncFederatedNode`` the callback times every batch and, once the node
    has planned, federates after the node's step budget instead of at epoch end. When training ends
    (``max_epochs``, ``should_stop``, early stopping) it federates once more if batches were trained
    since its last federation, then calls ``node.leave()`` from ``on_fit_end``; pass
    ``leave_on_train_end=False`` to run several ``fit`` calls with one node and call ``node.leave()`` yourself.
    """

    framework = "torch"
    model_suffix = ".pt"
    store_model_suffix = None  # torch.save is a pickle: it never goes into a shared store

    def __init__(
        self,
        node: Any,
        num_examples_per_epoch: int | None = None,
        include_buffers: bool = True,
        proximal_mu: float = 0.0,
        log_metrics: bool = True,
        *,
        eval_dataloader: Iterable[Any] | None = None,
        eval_steps: int | None = None,
        eval_fn: EvalFn | None = None,
        postfix_for_federated_metrics: str = "_fed",
        override_metrics_with_aggregated_metrics: bool = False,
        save_model_before_aggregation: bool = False,
        save_model_after_aggregation: bool = False,
        checkpoint_dir: str | os.PathLike[str] = "lightning",
        leave_on_train_end: bool = True,
    ) -> None:
        super().__init__()
        self._init_core(
            node,
            num_examples_per_epoch,
            proximal_mu,
            postfix_for_federated_metrics,
            override_metrics_with_aggregated_metrics,
            save_model_before_aggregation,
            save_model_after_aggregation,
            checkpoint_dir,
            leave_on_train_end,
        )
        check_given_with("eval_fn", eval_fn, "eval_dataloader", eval_dataloader)
        self.include_buffers = include_buffers
        self.log_metrics = log_metrics
        self.eval_dataloader = eval_dataloader
        self.eval_steps = check_positive_int("eval_steps", eval_steps, none=True)
        self.eval_fn = eval_fn
        self._trainer: Any = None
        self._module: Any = None
        self._examples = 0  # on this rank, since the last federation
        self._start_step = 0  # trainer.global_step at the last federation
        self._prox_step = -1

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: stable whichever package the class was built on."""
        return "FlwrFederatedCallback"

    def federated_names(self, module: torch.nn.Module) -> list[str]:
        """State-dict keys sent to the store: parameters, plus float buffers when ``include_buffers``."""
        params = {name for name, _ in module.named_parameters()}
        return [
            name
            for name, tensor in module.state_dict().items()
            if torch.is_floating_point(tensor) and (name in params or self.include_buffers)
        ]

    # -- Lightning hooks --------------------------------------------------------------
    def _bind(self, trainer: Any, pl_module: Any) -> None:
        self._trainer, self._module = trainer, pl_module

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._bind(trainer, pl_module)
        self._examples = 0
        self._start_step = self._prox_step = trainer.global_step
        self._start_training()  # FedProx anchors the initial (or restored, already federated) weights

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._bind(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._bind(trainer, pl_module)
        self._examples += leading_dim(batch)
        self._batch_end()
        # global_step counts optimizer steps: with gradient accumulation not every batch steps.
        if self._proximal.active and trainer.global_step != self._prox_step:
            self._prox_step = trainer.global_step
            self._proximal_step(trainer, pl_module)
        if self._budget_due:
            self._federate(trainer.current_epoch, trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._bind(trainer, pl_module)
        if self._budget is None:
            self._federate(trainer.current_epoch, trainer.callback_metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # The flush runs here, not in on_fit_end: the strategy (DDP broadcast) is still set up.
        self._bind(trainer, pl_module)
        self._finish_training(trainer.current_epoch, trainer.callback_metrics)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._bind(trainer, pl_module)
        self._leave()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # after on_fit_end (a no-op then), or where Lightning skipped it (tuner exit)
            self._bind(trainer, pl_module)
            self._leave()

    # -- the framework half of the core ----------------------------------------------
    def _is_rank_zero(self) -> bool:
        return bool(self._trainer is None or self._trainer.is_global_zero)

    def _on_rank_zero(self, exchange: Callable[[], Payload]) -> Payload:
        payload = exchange() if self._trainer.is_global_zero else None
        if self._trainer.world_size > 1:
            payload = self._trainer.strategy.broadcast(payload, src=0)
        assert payload is not None
        return payload

    def _get_arrays(self) -> list[np.ndarray]:
        state = self._module.state_dict()
        # bfloat16 travels as its raw bits (numpy has none), float16 as float16: nothing is upcast on the wire
        bits = native_bf16(self.node)
        return [to_numpy(state[name], bits) for name in self.federated_names(self._module)]

    def _tensor_names(self) -> list[str]:
        return self.federated_names(self._module)

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        state = self._module.state_dict()
        with torch.no_grad():
            for name, array in zip(self.federated_names(self._module), arrays):
                state[name].copy_(to_torch(array))  # copy_ keeps the tensor's dtype and device

    def _named_trainables(self) -> Iterable[tuple[str, Any]]:
        module = self._module
        return [] if module is None else [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def _copy_tensor(self, value: Any) -> Any:
        return value.detach().clone()

    def _count_examples(self) -> int:
        examples, self._examples = self._examples, 0
        trainer = self._trainer
        if self.num_examples_per_epoch is None and trainer.world_size > 1:
            total = trainer.strategy.reduce(torch.tensor(float(examples), device=self._module.device), reduce_op="sum")
            examples = int(total.item())
        return examples

    def _optimizer_steps(self) -> int:
        steps = self._trainer.global_step - self._start_step
        self._start_step = self._trainer.global_step
        return steps

    def _save_model(self, path: Path) -> None:
        torch.save(self._module.state_dict(), path)

    def _log(self, names_values: dict[str, float], final: bool) -> None:
        if self.log_metrics and not final:  # Lightning refuses self.log in on_train_end
            for name, value in names_values.items():
                self._module.log(name, value, prog_bar=True, on_step=False, on_epoch=True, sync_dist=False)

    def _evaluate(self) -> dict[str, float]:
        """The federated model on ``eval_dataloader`` (every rank alike: the model is identical on all)."""
        if self.eval_dataloader is None:
            return {}
        module, means = self._module, RunningMean()
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), _captured_logs(module) as captured:
                for batch_idx, batch in enumerate(self.eval_dataloader):
                    if self.eval_steps is not None and batch_idx >= self.eval_steps:
                        break
                    weight = leading_dim(batch) or 1
                    batch = self._trainer.strategy.batch_to_device(batch)
                    captured.clear()
                    if self.eval_fn is not None:
                        captured.update(self.eval_fn(module, batch, batch_idx))
                    else:
                        module.validation_step(batch, batch_idx)
                    means.add(captured, weight)
        finally:
            module.train(was_training)
        figures = means.result()
        if not figures:
            warnings.warn(
                "FlwrFederatedCallback: evaluating on eval_dataloader gave no figures (validation_step "
                "logged no numbers); pass eval_fn",
                stacklevel=2,
            )
        return figures

    @torch.no_grad()
    def _proximal_step(self, trainer: Any, module: torch.nn.Module) -> None:
        """w <- w - lr * mu * (w - w_fed) for every parameter an optimizer just stepped, at its group's lr."""
        names = {id(p): n for n, p in module.named_parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    pulled = self._proximal.pulled(names.get(id(param), ""), param, float(group["lr"]))
                    if pulled is not None:
                        param.copy_(pulled)


def make_callback_class(package: ModuleType) -> type:
    """``FlwrFederatedCallback`` on ``package.Callback`` (``lightning.pytorch`` or ``pytorch_lightning``)."""
    if package.Callback is _PACKAGE.Callback:
        return FlwrFederatedCallback
    return type(
        "FlwrFederatedCallback",
        (_LightningFederation, package.Callback),
        {"__module__": __name__, "__doc__": _LightningFederation.__doc__},
    )


_PACKAGE = _lightning_package()


class FlwrFederatedCallback(_LightningFederation, _PACKAGE.Callback):  # type: ignore[misc,name-defined]
    __doc__ = _LightningFederation.__doc__
