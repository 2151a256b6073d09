"""Federate 2-3 PyTorch Lightning nodes (threads) on label-skewed digits through any store URL.

    python examples/lightning_digits.py --store /tmp/x --nodes 2 --epochs 5
    python examples/lightning_digits.py --store s3://bucket/exp1 --mode sync

On real machines each node runs this same training code on its own data; only
the store URL is shared.
"""

from __future__ import annotations

import argparse
import tempfile
import threading

import lightning.pytorch as pl
import torch

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.lightning import FlwrFederatedCallback
from flwr_serverless.simulation.data import load_dataset, partition_label_skew


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # every node starts from the same weights
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="store URL (default: a new temp folder)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--mode", choices=["async", "sync"], default="async")
    parser.add_argument("--mu", type=float, default=0.0, help="FedProx proximal_mu (0: plain FedAvg)")
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="flwr-lightning-")

    x_train, y_train, x_test, y_test = load_dataset("digits")
    parts = partition_label_skew(y_train, args.nodes, skew=0.9, seed=0)
    accuracy: dict[int, float] = {}

    def run(i: int) -> None:
        torch.set_num_threads(1)
        if args.mode == "sync":
            node = SyncFederatedNode(store, num_nodes=args.nodes, node_id=f"node-{i}")
        else:
            node = AsyncFederatedNode(store, node_id=f"node-{i}")
        data = torch.utils.data.TensorDataset(torch.tensor(x_train[parts[i]]), torch.tensor(y_train[parts[i]]))
        model = Classifier()
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[FlwrFederatedCallback(node, proximal_mu=args.mu)],
        )  # the one line
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
        with torch.no_grad():
            predicted = model(torch.tensor(x_test)).argmax(1).numpy()
        accuracy[i] = float((predicted == y_test).mean())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"store: {store}")
    for i in sorted(accuracy):
        print(f"node-{i}: test accuracy {accuracy[i]:.3f}")


if __name__ == "__main__":
    main()
