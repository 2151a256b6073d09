"""FedProx as a local-solver option: one SGD step on a single linear layer against a hand computation."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from fakes import RecordingNode

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LR, MU = 0.1, 0.5
RNG = np.random.default_rng(3)
X = RNG.random((4, 3)).astype(np.float32)
Y = RNG.random((4, 2)).astype(np.float32)
W0 = RNG.normal(size=(3, 2)).astype(np.float32)
B0 = RNG.normal(size=(2,)).astype(np.float32)


def _expected(mu: float) -> tuple[np.ndarray, np.ndarray]:
    """One SGD step on mean((xW + b - y)^2), then w <- w - lr * mu * (w - w0)."""
    residual = X @ W0 + B0 - Y
    scale = 2.0 / residual.size
    w1 = W0 - LR * scale * (X.T @ residual)
    b1 = B0 - LR * scale * residual.sum(axis=0)
    return w1 - LR * mu * (w1 - W0), b1 - LR * mu * (b1 - B0)


# -- Lightning --------------------------------------------------------------------
def _lightning_fit(mu: float) -> tuple[np.ndarray, np.ndarray]:
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from flwr_serverless.callbacks.lightning import FlwrFederatedCallback

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
            with torch.no_grad():
                self.layer.weight.copy_(torch.from_numpy(W0.T.copy()))
                self.layer.bias.copy_(torch.from_numpy(B0))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR)

    module = Linear()
    data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[FlwrFederatedCallback(RecordingNode(metrics={}), proximal_mu=mu)],
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    return module.layer.weight.detach().numpy().T, module.layer.bias.detach().numpy()


def test_lightning_fedprox_step_matches_the_hand_computation() -> None:
    w, b = _lightning_fit(MU)
    w_exp, b_exp = _expected(MU)
    np.testing.assert_allclose(w, w_exp, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, b_exp, rtol=0, atol=1e-6)
    assert not np.allclose(w, _expected(0.0)[0], atol=1e-4)  # the proximal term did something


def test_lightning_mu_zero_is_plain_sgd_and_does_no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr_serverless.callbacks.lightning import FlwrFederatedCallback

    def fail(*args: Any) -> None:
        raise AssertionError("proximal step ran with mu = 0")

    monkeypatch.setattr(FlwrFederatedCallback, "_proximal_step", fail)
    w, b = _lightning_fit(0.0)
    np.testing.assert_allclose(w, _expected(0.0)[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, _expected(0.0)[1], rtol=0, atol=1e-6)


# -- Keras ----------------------------------------------------------------------------
def _keras_fit(mu: float, with_callback: bool = True) -> tuple[np.ndarray, np.ndarray]:
    keras = pytest.importorskip("keras")
    from flwr_serverless.callbacks.keras import FlwrFederatedCallback

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights([W0, B0])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    callbacks = (
        [FlwrFederatedCallback(RecordingNode(metrics={}), num_examples_per_epoch=4, proximal_mu=mu)]
        if with_callback
        else []
    )
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    w, b = model.get_weights()
    return w, b


def test_keras_fedprox_step_matches_the_hand_computation() -> None:
    w, b = _keras_fit(MU)
    w_exp, b_exp = _expected(MU)
    np.testing.assert_allclose(w, w_exp, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, b_exp, rtol=0, atol=1e-6)
    assert not np.allclose(w, _expected(0.0)[0], atol=1e-4)


def test_keras_mu_zero_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr_serverless.callbacks.keras import FlwrFederatedCallback

    def fail(*args: Any) -> None:
        raise AssertionError("proximal step ran with mu = 0")

    monkeypatch.setattr(FlwrFederatedCallback, "_proximal_step", fail)
    w, b = _keras_fit(0.0)
    w_plain, b_plain = _keras_fit(0.0, with_callback=False)
    np.testing.assert_array_equal(w, w_plain)
    np.testing.assert_array_equal(b, b_plain)
    np.testing.assert_allclose(w, _expected(0.0)[0], rtol=0, atol=1e-6)


def test_negative_mu_is_rejected() -> None:
    pytest.importorskip("keras")
    from flwr_serverless.callbacks.keras import FlwrFederatedCallback

    with pytest.raises(ValueError, match="proximal_mu"):
        FlwrFederatedCallback(RecordingNode(metrics={}), proximal_mu=-1.0)
