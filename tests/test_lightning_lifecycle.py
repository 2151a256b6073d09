"""The Lightning callback's end of training (flush, leave), evaluation, checkpoints, options and packages."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from fakes import PlannedNode, RecordingNode  # noqa: E402

from flwr_serverless.callbacks.lightning import FlwrFederatedCallback, make_callback_class  # noqa: E402
from flwr_serverless.stores import open_store  # noqa: E402


class _NetBody:
    """A linear classifier; mixed into either package's LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.layer(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y))
        self.log_dict({"val_acc": (logits.argmax(-1) == y).float().mean()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Net(_NetBody, pl.LightningModule):
    pass


def _loader(n: int = 103, batch_size: int = 10, seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.rand(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _fit(callback: Any, epochs: int = 3, extra: list[Any] | None = None, package: Any = pl) -> tuple[Any, Any]:
    trainer = package.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[callback, *(extra or [])],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = Net() if package is pl else type("Net", (_NetBody, package.LightningModule), {})()
    trainer.fit(module, _loader())
    return trainer, module


def test_sends_tensor_names_and_framework() -> None:
    node = RecordingNode()
    callback = FlwrFederatedCallback(node)
    _, module = _fit(callback, epochs=1)
    assert node.calls[0]["tensor_names"] == callback.federated_names(module) == ["layer.weight", "layer.bias"]
    assert node.calls[0]["framework"] == "torch"


def test_leaves_once_at_fit_end() -> None:
    node = RecordingNode()
    _fit(FlwrFederatedCallback(node), epochs=2)
    assert node.events == ["update", "update", "leave"]  # on_fit_end and teardown: one leave


def test_should_stop_mid_epoch_still_federates_and_leaves() -> None:
    class StopAtBatch(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                trainer.should_stop = True

    node = RecordingNode()
    _fit(FlwrFederatedCallback(node), epochs=5, extra=[StopAtBatch()])
    assert node.events == ["update", "leave"] and node.calls[0]["num_steps"] == 3


def test_semisync_budget_and_the_partial_budget_flushed_at_the_end() -> None:
    node = RecordingNode(budget=4)
    callback = FlwrFederatedCallback(node)
    _fit(callback, epochs=3)  # 33 batches: 11 (cold start), then 5 budgets of 4, then 2 left
    assert [c["num_steps"] for c in node.calls] == [11, 4, 4, 4, 4, 4, 2]
    assert sum(c["num_examples"] for c in node.calls) == 3 * 103
    assert node.events[-2:] == ["update", "leave"] and callback.pending_batches == 0
    assert len(node.batch_times) == 33


def test_leave_on_train_end_false() -> None:
    node = RecordingNode()
    _fit(FlwrFederatedCallback(node, leave_on_train_end=False), epochs=1)
    assert node.events == ["update"]


def test_real_async_node_on_memory_flushes_and_leaves_after_its_last_federation() -> None:
    node = PlannedNode(open_store(f"memory://lightning-leave-{uuid.uuid4().hex[:8]}"), node_id="l")
    _fit(FlwrFederatedCallback(node), epochs=2)  # 22 batches: 11, then 5 + 5, then 1 flushed
    assert node.stats.federations == 4 and node.left_after == 4 and node.local_steps == 22


# -- evaluation of the federated model -----------------------------------------------------
def _manual(module: Any, loader: Any, limit: int | None = None) -> dict[str, float]:
    """The figures validation_step computes, averaged over the loader weighted by batch size."""
    sums, count = {"val_loss": 0.0, "val_acc": 0.0}, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            logits = module.layer(x)
            sums["val_loss"] += float(torch.nn.functional.cross_entropy(logits, y)) * len(y)
            sums["val_acc"] += float((logits.argmax(-1) == y).float().mean()) * len(y)
            count += len(y)
    return {k: v / count for k, v in sums.items()}


def test_eval_dataloader_figures_are_the_federated_models() -> None:
    node = RecordingNode(shift=0.01)
    test = _loader(50, 8, seed=1)
    callback = FlwrFederatedCallback(node, eval_dataloader=test)
    trainer, module = _fit(callback, epochs=2)
    expected = _manual(module, test)  # the last federation's model is the final one
    assert callback.last_evaluation == pytest.approx(expected, rel=1e-5)
    assert float(trainer.callback_metrics["val_acc_fed"]) == pytest.approx(expected["val_acc"], rel=1e-5)
    assert float(trainer.callback_metrics["loss_fed"]) == pytest.approx(callback.last_federated_metrics["loss"])
    assert "val_acc" not in trainer.callback_metrics  # evaluation's self.log calls were captured, not logged
    assert module.training  # back in training mode


def test_eval_fn_and_eval_steps() -> None:
    def accuracy(module: Any, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        return {"val_acc": (module(x).argmax(-1) == y).float().mean()}

    test = _loader(50, 8, seed=1)
    callback = FlwrFederatedCallback(RecordingNode(), eval_dataloader=test, eval_steps=2, eval_fn=accuracy)
    _, module = _fit(callback, epochs=1)
    assert callback.last_evaluation == pytest.approx({"val_acc": _manual(module, test, limit=2)["val_acc"]})


def test_an_evaluation_without_figures_warns() -> None:
    callback = FlwrFederatedCallback(RecordingNode(), eval_dataloader=_loader(8, 8), eval_fn=lambda m, b, i: {})
    with pytest.warns(UserWarning, match="no figures"):
        _fit(callback, epochs=1)


def test_postfix_and_override() -> None:
    node = RecordingNode(metrics={"acc": 0.75})
    trainer, _ = _fit(FlwrFederatedCallback(node, postfix_for_federated_metrics="_global"), epochs=1)
    assert float(trainer.callback_metrics["acc_global"]) == 0.75 and "acc_fed" not in trainer.callback_metrics
    node = RecordingNode(metrics={"loss": 0.125})  # the module logs "loss" too: the federated figure wins
    trainer, _ = _fit(FlwrFederatedCallback(node, override_metrics_with_aggregated_metrics=True), epochs=2)
    assert float(trainer.callback_metrics["loss"]) == 0.125
    assert node.calls[1]["metrics"]["loss"] != 0.125  # ... while the node is still sent the local figure
    assert not any(k.endswith("_fed") for k in trainer.callback_metrics)


# -- checkpoints ------------------------------------------------------------------------------
def test_models_and_metrics_before_and_after_aggregation(tmp_path: Path) -> None:
    node = RecordingNode(shift=1.0, metrics={"loss": 0.5}, node_id="n1")
    callback = FlwrFederatedCallback(
        node, save_model_before_aggregation=True, save_model_after_aggregation=True, checkpoint_dir=tmp_path
    )
    _fit(callback, epochs=2)
    folder = tmp_path / "n1"
    assert len(list(folder.iterdir())) == 8
    for epoch, call in enumerate(node.calls):
        before = torch.load(folder / f"model_before_aggregation_{epoch:05d}.pt", weights_only=True)
        after = torch.load(folder / f"model_after_aggregation_{epoch:05d}.pt", weights_only=True)
        for name, sent in zip(call["tensor_names"], call["weights"]):
            np.testing.assert_array_equal(before[name].numpy(), sent)
            np.testing.assert_allclose(after[name].numpy(), sent + 1.0, rtol=1e-6)
        local = json.loads((folder / f"metrics_before_aggregation_{epoch:05d}.json").read_text())
        assert local == pytest.approx(call["metrics"]) and "loss" in local
        assert json.loads((folder / f"metrics_after_aggregation_{epoch:05d}.json").read_text()) == {"loss": 0.5}


# -- options and packages -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"eval_fn": lambda m, b, i: {}}, "eval_fn"),
        ({"eval_steps": 0}, "eval_steps"),
        ({"proximal_mu": -1.0}, "proximal_mu"),
        ({"num_examples_per_epoch": 0}, "num_examples_per_epoch"),
        ({"postfix_for_federated_metrics": 3}, "postfix_for_federated_metrics"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FlwrFederatedCallback(RecordingNode(), **options)


def test_module_level_class_and_the_other_package(tmp_path: Path) -> None:
    assert FlwrFederatedCallback.__qualname__ == "FlwrFederatedCallback"
    assert isinstance(FlwrFederatedCallback(RecordingNode()), pl.Callback)
    assert make_callback_class(pl) is FlwrFederatedCallback
    legacy = pytest.importorskip("pytorch_lightning")
    other = make_callback_class(legacy)
    assert issubclass(other, legacy.Callback) and not issubclass(other, pl.Callback)
    node = RecordingNode()
    callback = other(node)
    trainer, _ = _fit(callback, epochs=1, package=legacy)
    assert node.events == ["update", "leave"] and callback.state_key == FlwrFederatedCallback(node).state_key
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert saved["callbacks"]["FlwrFederatedCallback"] == {"node": node.state}
