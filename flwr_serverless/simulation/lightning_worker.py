"""Train one simulated node with PyTorch Lightning: same ``train_node(task, progress)`` contract as keras_worker.

torch and Lightning are imported inside ``train_node`` only, so the runner and
the CLI stay light, and a spawned process imports them once, on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr_serverless.simulation.federation import callback_kwargs, make_node
from flwr_serverless.simulation.heterogeneity import (
    FederationProbe,
    TimeBudget,
    epoch_event,
    make_lightning_slowdown_callback,
    slowdown_factor,
)
from flwr_serverless.simulation.keras_worker import eval_slice, load_node_data, node_result

if TYPE_CHECKING:
    from flwr_serverless.simulation.runner import NodeTask

ProgressFn = Callable[[dict[str, Any]], None]


def build_torch_model(input_size: int, num_classes: int, seed: int = 0) -> Any:
    """An MLP like the Keras digits model (64-64 ReLU); the same seed gives every node the same start."""
    import torch

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(input_size, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Linear(64, num_classes),
        )
    finally:
        torch.random.set_rng_state(generator_state)  # threads share torch's global generator


def _lightning_classes(learning_rate: float) -> tuple[Any, Any]:
    """The LightningModule and the progress callback, built on the installed Lightning package."""
    import torch

    from flwr_serverless.callbacks.lightning import _lightning_package

    pl = _lightning_package()

    class Classifier(pl.LightningModule):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            accuracy = (logits.argmax(1) == y).float().mean()
            self.log("loss", loss, on_step=False, on_epoch=True)
            self.log("accuracy", accuracy, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=learning_rate)

    class Progress(pl.Callback):
        """Reports each finished epoch (after the federated callback, so ``_fed`` metrics are in); with a
        probe, also tests the model after each federation and stops at the time budget.
        """

        def __init__(
            self,
            task: NodeTask,
            progress: ProgressFn,
            started: float,
            fed: Any,
            probe: FederationProbe | None,
            budget: TimeBudget,
        ) -> None:
            self.task, self.progress, self.started, self.fed = task, progress, started, fed
            self.probe, self.budget = probe, budget
            self.epochs_completed = 0
            self.history: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.probe is not None:
                self.probe.after_batch()
            if self.budget.spent():
                trainer.should_stop = True

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            numbers = {k: float(v) for k, v in trainer.callback_metrics.items() if not k.endswith("_fed")}
            if self.fed is not None:
                numbers.update({f"{k}_fed": v for k, v in self.fed.last_federated_metrics.items()})
            if self.probe is not None:
                numbers.update(self.probe.epoch_end())
            self.epochs_completed = trainer.current_epoch + 1
            self.history.append(numbers)
            self.progress(epoch_event(self.task, self.epochs_completed, numbers, self.started))

    return Classifier, Progress


def _accuracy(module: Any, x: Any, y: Any) -> float:
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            logits = module(torch.tensor(x, dtype=torch.float32))
        return float((logits.argmax(1) == torch.tensor(y, dtype=torch.long)).float().mean())
    finally:
        module.train(was_training)


def train_node(task: NodeTask, progress: ProgressFn) -> dict[str, Any]:
    """Build the model, train ``task.config.epochs`` epochs (federating if ``task.role == 'federated'``), test it."""
    import torch

    from flwr_serverless.callbacks.lightning import FlwrFederatedCallback, _lightning_package

    torch.set_num_threads(1)  # nodes share 2 cores; more threads per node only contend
    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no per-Trainer banner lines in the report
    pl = _lightning_package()
    config = task.config
    started = time.monotonic()
    x, y, x_test, y_test, num_classes = load_node_data(task)
    input_size = int(x.reshape(len(x), -1).shape[1])
    net = build_torch_model(input_size, num_classes, seed=config.seed)
    classifier_cls, progress_cls = _lightning_classes(config.learning_rate)
    module = classifier_cls(net)

    dataset = torch.utils.data.TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
    shuffle = torch.Generator().manual_seed(task.shuffle_seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=shuffle)

    node = None
    fed = None
    if task.role == "federated":
        node = make_node(task, [p.detach().numpy().copy() for p in net.state_dict().values()])
        fed = FlwrFederatedCallback(node, **callback_kwargs(config))
    probe = None
    if config.evaluation.eval_each_epoch:
        x_eval, y_eval = eval_slice(task, x_test, y_test)
        probe = FederationProbe(node, lambda: _accuracy(module, x_eval, y_eval), started)
    reporter = progress_cls(task, progress, started, fed, probe, TimeBudget(config.heterogeneity.time_budget, started))
    factor, batch_seconds = slowdown_factor(task), config.heterogeneity.batch_seconds
    slowdown = make_lightning_slowdown_callback(pl, factor, batch_seconds) if factor > 1 or batch_seconds else None
    trainer = pl.Trainer(
        max_epochs=config.epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[c for c in (slowdown, fed, reporter) if c is not None],  # slowdown first: semi-sync times it
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    try:
        trainer.fit(module, loader)
        train_time = time.monotonic() - started
        module.eval()
        with torch.no_grad():
            logits = module(torch.tensor(x_test, dtype=torch.float32))
            labels = torch.tensor(y_test, dtype=torch.long)
            test_loss = float(torch.nn.functional.cross_entropy(logits, labels))
            test_accuracy = float((logits.argmax(1) == labels).float().mean())
    finally:
        if node is not None:
            node.store.close()

    return node_result(task, node, reporter, float(test_accuracy), float(test_loss), train_time, len(x))
