"""Bytes one node publishes per federation: the whole model against LoRA adapters only, and bf16 against float32.

Model: the Pythia-14M architecture (GPT-NeoX: 6 layers, hidden 128, 4 heads,
intermediate 512, vocabulary 50304), built from its config (no hub). Each case
federates once through ``flwr_serverless.torch.federate`` on a fresh in-memory
store and reads the size of the object the node left there (header included).
JSON goes to benchmarks/results/adapter_bytes.json.

    python benchmarks/adapter_bytes.py
"""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from flwr_serverless.nodes import AsyncFederatedNode
from flwr_serverless.stores import open_store
from flwr_serverless.torch import federate

RESULTS = Path(__file__).parent / "results"
ALL_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def pythia_14m(dtype: torch.dtype = torch.float32) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2048,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(config).to(dtype)


def published_bytes(model: torch.nn.Module) -> int:
    """Size of the object one federation leaves in the store for this node."""
    store = open_store(f"memory://adapter-bytes-{uuid.uuid4().hex[:8]}")
    node = AsyncFederatedNode(store, node_id="n0")
    federate(node, model, num_examples=1)
    sizes = [info.size for key, info in store.list("nodes/").items() if key.endswith("/n0")]
    return max(sizes)


def main() -> None:
    full = pythia_14m()
    parameters = sum(p.numel() for p in full.parameters())
    cases: dict[str, Any] = {}

    def record(key: str, label: str, model: torch.nn.Module) -> None:
        travelling = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cases[key] = {"label": label, "bytes": published_bytes(model), "trainable_parameters": travelling}

    record("full_float32", "full model, float32", full)
    record("full_bf16", "full model, bfloat16", pythia_14m(torch.bfloat16))
    lora_qkv = get_peft_model(pythia_14m(), LoraConfig(r=8, target_modules=["query_key_value"]))
    record("lora_qkv", "LoRA r=8 on query_key_value", lora_qkv)
    lora_all = get_peft_model(pythia_14m(), LoraConfig(r=8, target_modules=ALL_LINEAR))
    record("lora_all_linear", "LoRA r=8 on every linear layer", lora_all)
    base = cases["full_float32"]["bytes"]
    for case in cases.values():
        case["fraction_of_full_float32"] = case["bytes"] / base
    out = {
        "benchmark": "adapter_bytes",
        "model": "Pythia-14M architecture (GPT-NeoX 6x128, vocab 50304)",
        "parameters": parameters,
        "cases": cases,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": list(os.getloadavg()),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "adapter_bytes.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{parameters / 1e6:.1f}M parameters")
    for case in cases.values():
        share = 100 * case["fraction_of_full_float32"]
        print(f"{case['label']:32s} {case['bytes']:>12,d} bytes  {share:7.3f}% of full float32")


if __name__ == "__main__":
    main()
