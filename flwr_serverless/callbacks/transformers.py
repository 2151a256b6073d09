"""Hugging Face Transformers glue: ``Trainer(callbacks=[FlwrFederatedCallback(node)])``.

A ``transformers.TrainerCallback`` over the shared callback core (``callbacks/core.py``).
torch and transformers are imported only here, never by ``import flwr_serverless``.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from flwr_serverless.callbacks.core import FederatedCallbackCore, Payload
from flwr_serverless.callbacks.parts import numeric_metrics
from flwr_serverless.callbacks.torch_state import TorchTensors, _broadcast_object, broadcast_from_main, native_bf16
from flwr_serverless.validation import check_positive_int

__all__ = ["FlwrFederatedCallback"]

#: Written into each Trainer checkpoint folder: the node's identity and round, read back on resume.
STATE_FILE = "flwr_serverless_node.json"
_BOOKKEEPING = ("epoch", "step", "total_flos", "learning_rate")  # log entries that are not model figures


class FlwrFederatedCallback(FederatedCallbackCore, TrainerCallback):
    """Federate a ``transformers.Trainer``'s model through ``node`` as it trains.

    ``federate_every_steps=None`` federates at each epoch end; ``N`` every N optimizer steps
    (language-model fine-tuning is often a single epoch), plus once at train end for the rest.
    ``trainable_only`` (default: True for PEFT models) federates only parameters with
    ``requires_grad``: LoRA adapters travel and are averaged, the frozen base never leaves the
    node and is never written. ``include_buffers`` also federates float buffers. ``num_examples_per_epoch``
    weighs this node; ``None`` counts optimizer steps times the global batch (per-device batch x
    gradient accumulation x processes). ``proximal_mu > 0`` adds FedProx's pull to the last
    federated weights after every optimizer step.

    Figures: the peers' mean of the last training logs (``loss`` -> ``loss_fed``) and, with
    ``evaluate_federated_model`` and an eval dataset (``eval_dataset`` or the Trainer's), the
    federated model's evaluation (``eval_loss_fed``, plus ``compute_metrics``'). They go through
    ``trainer.log``: into ``trainer.state.log_history`` and every ``report_to`` logger.
    ``postfix_for_federated_metrics``, ``override_metrics_with_aggregated_metrics``,
    ``save_model_before_aggregation`` / ``save_model_after_aggregation`` (``torch.save`` of the
    state dict under ``checkpoint_dir``) and ``leave_on_train_end`` are as in the Keras callback.

    Multi-process (accelerate, torchrun): only the main process talks to the store; the result
    is broadcast so every rank loads the same weights. Resume: each Trainer checkpoint gets
    ``flwr_serverless_node.json`` (the node's identity and round), read back by
    ``trainer.train(resume_from_checkpoint=...)`` from ``<output_dir>/checkpoint-<step>``;
    ``state_dict`` / ``load_state_dict`` do it by hand.
    """

    framework = "torch"
    model_suffix = ".pt"
    store_model_suffix = None  # torch.save is a pickle: it never goes into a shared store

    def __init__(
        self,
        node: Any,
        num_examples_per_epoch: int | None = None,
        *,
        federate_every_steps: int | None = None,
        trainable_only: bool | None = None,
        include_buffers: bool = True,
        proximal_mu: float = 0.0,
        evaluate_federated_model: bool = True,
        eval_dataset: Any = None,
        postfix_for_federated_metrics: str = "_fed",
        override_metrics_with_aggregated_metrics: bool = False,
        save_model_before_aggregation: bool = False,
        save_model_after_aggregation: bool = False,
        checkpoint_dir: str | os.PathLike[str] = "checkpoints",
        leave_on_train_end: bool = True,
    ) -> None:
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
        self.federate_every_steps = check_positive_int("federate_every_steps", federate_every_steps, none=True)
        self.trainable_only = None if trainable_only is None else bool(trainable_only)
        self.include_buffers = bool(include_buffers)
        self.evaluate_federated_model = bool(evaluate_federated_model)
        self.eval_dataset = eval_dataset
        self.trainer: Trainer | None = None
        self.tensors: TorchTensors | None = None
        self._args: TrainingArguments | None = None
        self._state: TrainerState | None = None
        self._epoch = 0
        self._examples = 0  # since the last federation, all processes
        self._last_step = 0  # state.global_step at the last federation
        self._logs: dict[str, float] = {}  # the latest training figures the Trainer logged
        self._logging = False  # inside our own trainer.log call

    def bind_trainer(self, trainer: Trainer) -> None:
        """Name the Trainer to log through (found by itself when the Trainer runs the callback)."""
        self.trainer = trainer

    # -- Trainer events -----------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._args, self._state = args, state
        if self.trainer is None:
            self.trainer = _calling_trainer(self)
        _refuse_sharded(self.trainer)
        model = kwargs.get("model")
        if model is None and self.trainer is not None:
            model = self.trainer.model
        if model is None:
            raise RuntimeError("FlwrFederatedCallback: the Trainer passed no model to on_train_begin")
        if self.tensors is None or self.tensors.module is not model:
            self.tensors = TorchTensors(model, self.include_buffers, self.trainable_only, native_bf16(self.node))
        self._examples = 0
        self._last_step = state.global_step
        self._epoch = int(state.epoch or 0)
        if state.global_step > 0:  # resumed from a checkpoint: rejoin as the node that wrote it
            self._load_state_file(Path(args.output_dir or ".") / f"checkpoint-{state.global_step}" / STATE_FILE)
        self._start_training()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._epoch = math.floor(state.epoch or 0)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._batch_begin()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        optimizer = kwargs.get("optimizer")
        if self._proximal.active and optimizer is not None and self.tensors is not None:
            self._proximal_step(optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._batch_end()
        self._examples += args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        every = self.federate_every_steps
        if (every is not None and state.global_step - self._last_step >= every) or self._budget_due:
            self._federate(self._epoch, self._logs)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.federate_every_steps is None and self._budget is None and self._batches > 0:
            dataloader = kwargs.get("train_dataloader")
            size = _dataset_size(dataloader)
            if size is not None:  # the last batch of an epoch may be short
                self._examples = min(self._examples, size)
            self._federate(self._epoch, self._logs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs") or {}
        if not self._logging and "loss" in logs:  # training logs, not evaluation or our own
            self._logs = {k: v for k, v in numeric_metrics(logs, self.postfix_for_federated_metrics).items()}
            for key in _BOOKKEEPING:
                self._logs.pop(key, None)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._is_rank_zero():
            self._save_state_file(Path(args.output_dir or ".") / f"checkpoint-{state.global_step}" / STATE_FILE)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._finish_training(self._epoch, self._logs)
        self._leave()

    # -- the framework half of the core ----------------------------------------------
    def _bound(self) -> TorchTensors:
        if self.tensors is None:
            raise RuntimeError("FlwrFederatedCallback federates inside Trainer.train() only")
        return self.tensors

    def _get_arrays(self) -> list[np.ndarray]:
        return self._bound().get_arrays()

    def _tensor_names(self) -> list[str]:
        return self._bound().names()

    def _set_arrays(self, arrays: list[np.ndarray]) -> None:
        self._bound().set_arrays(arrays)

    def _named_trainables(self) -> Iterable[tuple[str, Any]]:
        return [] if self.tensors is None else self.tensors.named_trainables()

    def _copy_tensor(self, value: Any) -> Any:
        return value.detach().clone()

    def _count_examples(self) -> int:
        examples, self._examples = self._examples, 0
        return examples

    def _optimizer_steps(self) -> int:
        step = self._state.global_step if self._state is not None else self._last_step
        steps, self._last_step = step - self._last_step, step
        return steps

    def _world(self) -> tuple[bool, int, Callable[[Any], Any]]:
        """(main process?, processes, broadcast from the main process): torch.distributed as accelerate set it up."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0, dist.get_world_size(), _broadcast_object
        return True, 1, lambda obj: obj

    def _is_rank_zero(self) -> bool:
        return self._world()[0]

    def _on_rank_zero(self, exchange: Callable[[], Payload]) -> Payload:
        is_main, world, broadcast = self._world()
        if world == 1:
            return exchange()
        return broadcast_from_main(exchange, is_main, broadcast)

    def _save_model(self, path: Path) -> None:
        torch.save(self._bound().module.state_dict(), path)

    def _evaluate(self) -> dict[str, float]:
        """The federated model on the eval dataset (every rank: evaluation gathers across processes)."""
        trainer = self.trainer
        dataset = self.eval_dataset if self.eval_dataset is not None else getattr(trainer, "eval_dataset", None)
        if not self.evaluate_federated_model or trainer is None or dataset is None:
            return {}
        named = dataset if isinstance(dataset, Mapping) else {"": dataset}
        figures: dict[str, float] = {}
        for name, data in named.items():
            prefix = f"eval_{name}" if name else "eval"
            output = trainer.evaluation_loop(
                trainer.get_eval_dataloader(data), description="Federated evaluation", metric_key_prefix=prefix
            )
            figures.update(
                (k, v)
                for k, v in numeric_metrics(output.metrics, suffix=None).items()
                if not k.endswith(("_runtime", "_per_second", "_model_preparation_time"))
            )
        return figures

    def _log(self, names_values: dict[str, float], final: bool) -> None:
        """Through ``trainer.log``: log_history and every ``report_to`` logger see the figures."""
        if not names_values:
            return
        if self.trainer is not None:
            self._logging = True
            try:
                self.trainer.log(dict(names_values))
            finally:
                self._logging = False
        elif self._state is not None:  # no Trainer found: at least keep the history
            state = self._state
            self._state.log_history.append({**names_values, "epoch": state.epoch, "step": state.global_step})

    @torch.no_grad()
    def _proximal_step(self, optimizer: Any) -> None:
        """w <- w - lr * mu * (w - w_fed) for every parameter the optimizer just stepped, at its group's lr."""
        names = {id(p): n for n, p in self._bound().module.named_parameters()}
        for group in optimizer.param_groups:
            for param in group["params"]:
                pulled = self._proximal.pulled(names.get(id(param), ""), param, float(group["lr"]))
                if pulled is not None:
                    param.copy_(pulled)


def _calling_trainer(callback: TrainerCallback, depth: int = 12) -> Trainer | None:
    """The Trainer whose callback handler is running ``callback`` (a few frames up the stack)."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _refuse_sharded(trainer: Trainer | None) -> None:
    """FSDP and DeepSpeed ZeRO-3 shard parameters across ranks: rank 0 does not hold the whole model."""
    if trainer is None:
        return
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(plugin, "zero_stage", 0) == 3:
        raise ValueError(
            "FlwrFederatedCallback federates replicated parameters (DDP, DeepSpeed ZeRO-1/2); FSDP and ZeRO-3 "
            "shard them across processes, which it does not support"
        )


def _dataset_size(dataloader: Any) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None
