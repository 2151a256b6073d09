"""Native half precision: bfloat16 and float16 travel as 2 bytes a value and come back in their own dtype."""

from __future__ import annotations

import json
import struct
import threading
import uuid

import numpy as np
import pytest
from flwr.server.strategy import FedMedian

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.strategy.aggregate import Contribution, aggregate, weighted_mean
from flwr_serverless.wire.codec import UpdateHeader, decode, encode
from flwr_serverless.wire.dtypes import BF16, bf16_to_float32, dtype_name, float_to_bf16


def _bf16(seed: int, shape: tuple[int, ...] = (4, 6)) -> np.ndarray:
    return float_to_bf16(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _layout(data: bytes) -> dict:
    (size,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8 : 8 + size])


def test_bf16_and_fp16_round_trip_bit_exact_at_two_bytes_a_value() -> None:
    arrays = [_bf16(0), np.random.default_rng(1).standard_normal(10).astype(np.float16), np.zeros((0, 3), BF16)]
    data = encode(arrays, UpdateHeader("n"), names=["w", "h", "empty"])
    layout = _layout(data)
    assert [layout[n]["dtype"] for n in ("w", "h", "empty")] == ["BF16", "F16", "BF16"]
    assert layout["w"]["data_offsets"][1] - layout["w"]["data_offsets"][0] == 24 * 2  # not widened to 4 bytes
    decoded = decode(data, "k", expected=[(a.shape, a.dtype) for a in arrays])
    for original, back in zip(arrays, decoded.arrays):
        assert back.dtype == original.dtype and back.shape == original.shape
        assert np.array_equal(
            back.view(np.uint16) if back.dtype == BF16 else back,
            original.view(np.uint16) if original.dtype == BF16 else original,
        )


def test_bf16_objects_are_safetensors_bf16() -> None:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    array = _bf16(2)
    loaded = safetensors_torch.load(encode([array], UpdateHeader("n"), names=["w"]))["w"]
    assert loaded.dtype == torch.bfloat16
    assert np.array_equal(loaded.float().numpy(), bf16_to_float32(array))


@pytest.mark.parametrize("bits", [0x7F80, 0xFF80, 0x7FC0])  # +Inf, -Inf, NaN
def test_non_finite_bf16_is_rejected(bits: int) -> None:
    array = _bf16(3)
    array.view(np.uint16)[1, 2] = bits
    with pytest.raises(InvalidObjectError, match="NaN or Inf"):
        decode(encode([array], UpdateHeader("n"), names=["w"]), "nodes/n")


def test_bf16_is_not_float32_nor_uint16_to_a_reader() -> None:
    data = encode([_bf16(4)], UpdateHeader("n"), names=["w"])
    for local in (np.float32, np.uint16):
        with pytest.raises(InvalidObjectError, match="w"):
            decode(data, "nodes/n", expected=[((4, 6), np.dtype(local))], expected_names=["w"])


def test_only_the_bf16_marker_among_structured_dtypes_can_be_stored() -> None:
    assert dtype_name(BF16) == "BF16"
    with pytest.raises(TypeError, match="cannot be stored"):
        dtype_name(np.dtype([("other", "<u2")]))


def test_aggregation_runs_wide_and_rounds_back_to_bf16() -> None:
    a, b, c = _bf16(5), _bf16(6), _bf16(7)
    mean = weighted_mean([[a], [b], [c]], [1.0, 2.0, 3.0])[0]
    assert mean.dtype == BF16
    exact = (bf16_to_float32(a).astype(np.float64) + 2 * bf16_to_float32(b) + 3 * bf16_to_float32(c)) / 6
    assert np.array_equal(mean.view(np.uint16), float_to_bf16(exact.astype(np.float32)).view(np.uint16))
    # A Flower strategy computes on float32 copies; its answer comes back as bf16 too.
    median = aggregate(FedMedian(), 1, [Contribution(n, [x], 1.0, 1) for n, x in zip("abc", (a, b, c))])[0]
    assert median.dtype == BF16
    expected = np.median(np.stack([bf16_to_float32(x) for x in (a, b, c)]), axis=0)
    assert np.array_equal(bf16_to_float32(median), expected)


def test_torch_half_modules_federate_in_their_own_dtype() -> None:
    torch = pytest.importorskip("torch")
    from flwr_serverless.nodes import SyncFederatedNode
    from flwr_serverless.stores import open_store
    from flwr_serverless.torch import federate

    url = f"memory://half-{uuid.uuid4().hex[:8]}"
    dtypes = {"a": torch.bfloat16, "b": torch.bfloat16}
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[name] = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4, dtype=torch.float16))
        models[name][0].to(dtypes[name])
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            node = SyncFederatedNode(open_store(url), num_nodes=2, timeout=60, node_id=name)
            federate(node, models[name], num_examples=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    a, b = models["a"], models["b"]
    assert a[0].weight.dtype == torch.bfloat16 and a[1].weight.dtype == torch.float16
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    store = open_store(url)
    sizes = [info.size for key, info in store.list("").items() if key.rsplit("/", 1)[-1] == "a"]
    values = sum(p.numel() for p in a.parameters())
    assert sizes and max(sizes) < values * 2 + 2048  # 2 bytes a value plus the header, never 4


def test_lightning_callback_sends_bf16_bits_and_loads_them_back() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    from fakes import RecordingNode

    from flwr_serverless.callbacks.lightning import FlwrFederatedCallback

    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    callback = FlwrFederatedCallback(RecordingNode())
    callback._module = module
    arrays = callback._get_arrays()
    assert [a.dtype for a in arrays] == [BF16, BF16]
    callback._set_arrays([float_to_bf16(bf16_to_float32(a) + 1) for a in arrays])
    assert module.weight.dtype == torch.bfloat16
    assert np.array_equal(
        module.weight.detach().float().numpy(), bf16_to_float32(float_to_bf16(bf16_to_float32(arrays[0]) + 1))
    )


@pytest.mark.parametrize("mode", ["aggregate", "fedasync-alpha"])
def test_modes_with_their_own_arithmetic_get_bf16_widened_to_float32(mode: str) -> None:
    torch = pytest.importorskip("torch")
    from flwr_serverless.node import AggregateFederatedNode
    from flwr_serverless.nodes import AsyncFederatedNode
    from flwr_serverless.stores import open_store
    from flwr_serverless.torch import TorchFederation

    url = f"memory://half-{mode}-{uuid.uuid4().hex[:8]}"
    for i in range(2):
        torch.manual_seed(i)
        module = torch.nn.Linear(4, 4).to(torch.bfloat16)
        store = open_store(url)
        node = AggregateFederatedNode(store, node_id=f"n{i}") if mode == "aggregate" else None
        node = node or AsyncFederatedNode(store, node_id=f"n{i}", alpha=0.5)
        federation = TorchFederation(node, module)
        assert federation.tensors.get_arrays()[0].dtype == np.float32
        federation(num_examples=1)
        assert module.weight.dtype == torch.bfloat16
