"""Resume after a restart: a job rejoins as the same node, at the experiment's current round, without deadlock."""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pytest

from flwr_serverless.nodes import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.stores import open_store
from tests.threads import in_background

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _url() -> str:
    return f"memory://resume-{uuid.uuid4().hex[:8]}"


def test_node_state_dict_round_trips() -> None:
    node = SyncFederatedNode(_url(), num_nodes=2, node_id="a")
    node.local_steps, node.round, node.stats.federations = 30, 3, 3
    fresh = SyncFederatedNode(node.store, num_nodes=2)
    fresh.load_state_dict(node.state_dict())
    assert (fresh.node_id, fresh.local_steps, fresh.round, fresh.stats.federations) == ("a", 30, 3, 3)
    with pytest.raises(ValueError):
        fresh.load_state_dict({"node_id": "../evil"})


def test_restarted_sync_node_rejoins_at_the_round_its_peer_waits_in() -> None:
    """b restarts from its state_dict (owner token included) within its lease: a waits for it, it rejoins.

    (A node that stays away past its lease is dropped from the barrier instead: see test_lifecycle.py.)
    """
    url = _url()
    ones = [np.ones(3, np.float32)]
    a = SyncFederatedNode(open_store(url), num_nodes=2, timeout=30, node_id="a")
    b = SyncFederatedNode(open_store(url), num_nodes=2, timeout=30, node_id="b", member_lease=60)

    def rounds(node: SyncFederatedNode, value: float, count: int) -> list[np.ndarray]:
        return [node.update_parameters([o * value for o in ones], 1)[0][0] for _ in range(count)]

    peer_run = in_background(lambda: rounds(a, 1.0, 5))
    rounds(b, 3.0, 2)  # b takes part in rounds 0 and 1, then "crashes"
    b2 = SyncFederatedNode(open_store(url), num_nodes=2, timeout=30, node_id="b", member_lease=60)
    b2.load_state_dict(b.state_dict())
    got_b = rounds(b2, 3.0, 3)  # a waits in round 2: b2 must publish there, not in round 0
    got_a = peer_run.result()
    assert a.round == b2.round == 5
    for x, y in zip(got_a[2:], got_b):
        np.testing.assert_array_equal(x, y)
    left = a.store.list("rounds/")
    assert not any(k.startswith(SyncFederatedNode.round_prefix(0)) for k in left)  # b2 cleaned its old rounds


# -- Lightning: stop after 2 epochs, restart from the checkpoint, finish 5 --------------
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_lightning_node_restarted_from_checkpoint_continues_as_the_same_node(mode: str, tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("lightning.pytorch")
    from flwr_serverless.callbacks.lightning import FlwrFederatedCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer = torch.nn.Linear(4, 3)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.rand(40, 4, generator=gen), torch.randint(0, 3, (40,), generator=gen))
    url = _url()

    def make_node(node_id: str | None = None) -> Any:
        if mode == "sync":
            return SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id=node_id)
        return AsyncFederatedNode(open_store(url), node_id=node_id)

    def fit(node: Any, epochs: int, ckpt: str | None = None, save: str | None = None, leave: bool = True) -> Any:
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[FlwrFederatedCallback(node, leave_on_train_end=leave)],
        )
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=10), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return trainer.current_epoch

    peer = make_node("peer")
    peer_run = in_background(lambda: fit(peer, 5))
    first = make_node()  # a random id, as a job without a configured id gets
    checkpoint = str(tmp_path / "node.ckpt")
    fit(first, 2, save=checkpoint, leave=False)  # the job "crashes" after 2 epochs: it does not leave
    restarted = make_node()  # the new process knows nothing ...
    assert restarted.node_id != first.node_id
    assert fit(restarted, 5, ckpt=checkpoint) == 5  # ... until the checkpoint restores the node
    assert peer_run.result() == 5
    assert restarted.node_id == first.node_id
    assert restarted.stats.federations == 5 and peer.stats.federations == 5
    assert sorted(k.split("/", 1)[1] for k in peer.store.list("members/")) == sorted(["peer", first.node_id])
    if mode == "sync":
        assert restarted.round == peer.round == 5


# -- Keras: the node's state in a JSON file next to the checkpoint ----------------------
def test_keras_state_path_rejoins_a_sync_experiment(tmp_path: Any) -> None:
    keras = pytest.importorskip("keras")
    from flwr_serverless.callbacks.keras import FlwrFederatedCallback

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 4), dtype=np.float32), rng.integers(0, 3, 40)
    url = _url()
    peer = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id="peer")
    start = model.get_weights()
    peer_run = in_background(lambda: [peer.update_parameters(start, 10) for _ in range(4)])
    state_path = tmp_path / "ckpt" / "federation.json"

    first = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60)
    # The job "crashes" after 2 epochs: no leave, so the peer waits for it in round 2.
    model.fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[FlwrFederatedCallback(first, state_path=state_path, leave_on_train_end=False)],
    )
    assert state_path.exists()
    restarted = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60)  # new process, new random id
    model.fit(x, y, epochs=2, verbose=0, callbacks=[FlwrFederatedCallback(restarted, state_path=state_path)])
    peer_run.result()
    assert restarted.node_id == first.node_id
    assert restarted.round == peer.round == 4
    assert restarted.local_steps == first.local_steps * 2
