"""The weights format: lossless round trip, readable by safetensors, and every bad object rejected with a reason."""

from __future__ import annotations

import io
import json
import pickle
import struct

import numpy as np
import pytest

from flwr_serverless.codec import FORMAT, UpdateHeader, decode, encode
from flwr_serverless.errors import InvalidObjectError


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((4, 3)).astype(np.float32),
        rng.standard_normal(7),
        np.arange(5, dtype=np.int64),
        np.zeros((0, 2), dtype=np.float16),
        np.array(2.5, dtype=np.float32),
        np.array([True, False]),
    ]


def _spec(arrays):
    return [(a.shape, a.dtype) for a in arrays]


def test_round_trip_is_lossless_and_keeps_header():
    arrays = _arrays()
    header = UpdateHeader("node-a", epoch=3, num_examples=120, local_steps=40, base_version=2, base_steps=80,
                          metrics={"loss": 0.25, "accuracy": 0.9, "name": "x"})
    decoded = decode(encode(arrays, header), "nodes/node-a", expected=_spec(arrays))
    assert decoded.header == header
    for original, back in zip(arrays, decoded.arrays):
        assert back.dtype == original.dtype and back.shape == original.shape
        assert np.array_equal(original, back)


def test_big_endian_input_is_stored_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    decoded = decode(encode([array], UpdateHeader("n")), "k")
    assert decoded.arrays[0].dtype == np.dtype("<f4")
    assert np.array_equal(decoded.arrays[0], array)


def test_objects_are_valid_safetensors():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = _arrays()
    loaded = safetensors_numpy.load(encode(arrays, UpdateHeader("n")))
    assert [loaded[f"t{i:04d}"].tolist() for i in range(len(arrays))] == [a.tolist() for a in arrays]


def _rejected(data: bytes, match: str, **kwargs) -> InvalidObjectError:
    with pytest.raises(InvalidObjectError, match=match) as info:
        decode(data, "nodes/peer", **kwargs)
    assert info.value.key == "nodes/peer"
    assert "nodes/peer" in str(info.value)
    return info.value


def test_pickle_is_rejected_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    _rejected(pickle.dumps([Exploit(), np.ones(3)]), "not a flwr-serverless|header claims|truncated")
    assert not marker.exists()


def test_numpy_npz_is_foreign():
    buffer = io.BytesIO()
    np.savez(buffer, a=np.ones(3))
    _rejected(buffer.getvalue(), "not a flwr-serverless|header claims|truncated")


def test_corrupted_payload_fails_checksum():
    data = bytearray(encode(_arrays(), UpdateHeader("n")))
    data[-3] ^= 0xFF
    _rejected(bytes(data), "checksum")


@pytest.mark.parametrize("cut", [0, 5, 9, 40, -1, -17])
def test_truncated_objects(cut):
    data = encode(_arrays(), UpdateHeader("n"))
    _rejected(data[:cut], "truncated|not a flwr-serverless|payload")


def test_wrong_format_version():
    data = encode([np.ones(2, np.float32)], UpdateHeader("n"))
    (n,) = struct.unpack_from("<Q", data)
    top = json.loads(data[8 : 8 + n])
    meta = json.loads(top["__metadata__"]["flwr_serverless"])
    meta["format"] = "flwr-serverless/99"
    top["__metadata__"]["flwr_serverless"] = json.dumps(meta)
    raw = json.dumps(top).encode()
    _rejected(struct.pack("<Q", len(raw)) + raw + data[8 + n :], "unsupported format version")
    assert FORMAT == "flwr-serverless/2"


def test_absurd_header_size():
    _rejected(struct.pack("<Q", 2**62) + b"{}", "header claims")


def test_shape_dtype_and_count_mismatch_against_local_model():
    data = encode([np.ones((3, 4), np.float32), np.ones(2, np.float32)], UpdateHeader("n"))
    _rejected(data, r"float32\[4, 3\]", expected=[((4, 3), np.float32), ((2,), np.float32)])
    _rejected(data, "float64", expected=[((3, 4), np.float64), ((2,), np.float32)])
    _rejected(data, "has 2 tensors, the local model has 1", expected=[((3, 4), np.float32)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    array = np.ones(4, np.float32)
    array[2] = bad
    _rejected(encode([array], UpdateHeader("n")), "NaN or Inf")


def test_signed_objects():
    arrays = [np.ones(3, np.float32)]
    signed = encode(arrays, UpdateHeader("n"), secret=b"s3cret")
    assert decode(signed, "k", secret=b"s3cret").arrays[0].tolist() == [1, 1, 1]
    assert decode(signed, "k").arrays[0].tolist() == [1, 1, 1]  # readers without a secret still read
    _rejected(encode(arrays, UpdateHeader("n")), "unsigned", secret=b"s3cret")
    _rejected(signed, "bad signature", secret=b"other")


def test_forged_header_breaks_signature():
    signed = encode([np.ones(3, np.float32)], UpdateHeader("n", num_examples=10), secret=b"k")
    forged = signed.replace(b'\\"num_examples\\": 10', b'\\"num_examples\\": 99')
    assert forged != signed
    _rejected(forged, "bad signature", secret=b"k")


@pytest.mark.parametrize("node_id", ["../etc", "a/b", "x\ny", "", ".hidden"])
def test_node_ids_must_be_plain_names(node_id):
    with pytest.raises(ValueError):
        encode([np.ones(1)], UpdateHeader(node_id))
