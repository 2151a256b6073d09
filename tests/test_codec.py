"""The weights format: lossless round trip, readable by safetensors, and every bad object rejected with a reason."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct

import blake3
import numpy as np
import pytest
from objects import rewrite, split, v1_object

from flwr_serverless.errors import InvalidObjectError
from flwr_serverless.wire.codec import FORMAT, UpdateHeader, decode, encode, encode_parts, object_ref
from flwr_serverless.wire.tensor_match import check_compatible


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
    header = UpdateHeader(
        "node-a",
        epoch=3,
        num_examples=120,
        local_steps=40,
        base_version=2,
        base_steps=80,
        metrics={"loss": 0.25, "accuracy": 0.9, "name": "x"},
    )
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


# -- format version 2: typed header fields ---------------------------------------------------------------
def test_typed_provenance_fields_round_trip():
    header = UpdateHeader(
        "n",
        epoch=2,
        num_examples=9,
        local_steps=30,
        seq=4,
        base_own_seq=3,
        base_own_steps=20,
        dataset_size=1200,
        framework="torch",
        extra={"future": [1, 2]},
    )
    decoded = decode(encode([np.ones(2, np.float32)], header), "k")
    assert decoded.header == header
    fields, _, _ = split(encode([np.ones(2, np.float32)], header))
    assert fields["seq"] == 4 and fields["dataset_size"] == 1200 and fields["extra"] == {"future": [1, 2]}


def test_version_1_objects_still_decode_into_typed_fields():
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    data = v1_object(
        arrays, extra={"seq": 5, "base_own_seq": 4, "base_own_steps": 6, "dataset_size": 300, "note": "kept"}
    )
    decoded = decode(data, "nodes/old", expected=_spec(arrays))
    header = decoded.header
    assert (header.seq, header.base_own_seq, header.base_own_steps, header.dataset_size) == (5, 4, 6, 300)
    assert header.extra == {"note": "kept"} and header.local_steps == 7
    assert decoded.payload_hash.startswith("sha256:") and decoded.lossless
    assert np.array_equal(decoded.arrays[0], arrays[0])
    _rejected(v1_object(arrays, extra={"seq": -1}), "'seq'")
    _rejected(v1_object(arrays)[:-2] + b"\x00\x01", "checksum")


def test_unknown_fields_of_a_newer_writer_land_in_extra():
    data = rewrite(encode([np.ones(2, np.float32)], UpdateHeader("n")), lambda f: f.update(shiny=True))
    assert decode(data, "k").header.extra == {"shiny": True}


HOSTILE_FIELDS = [
    ("seq", -1),
    ("seq", True),
    ("seq", 2**60),
    ("seq", "3"),
    ("seq", 1.5),
    ("seq", None),
    ("num_examples", -5),
    ("local_steps", 10**30),
    ("epoch", [1]),
    ("base_version", False),
    ("base_steps", -1),
    ("round", -1),
    ("round", "1"),
    ("dataset_size", 0),
    ("dataset_size", True),
    ("dataset_size", 2.5),
    ("timestamp", "now"),
    ("timestamp", -1.0),
    ("timestamp", float("nan")),
    ("timestamp", 1e300),
    ("framework", 5),
    ("framework", "Keras; rm -rf"),
    ("node_id", 7),
    ("node_id", "../x"),
    ("metrics", [1]),
    ("extra", "x"),
    ("payload_hash", "md5:00"),
    ("payload_hash", 5),
    ("keyframe", {"seq": -1, "payload_hash": "blake3:" + "0" * 64}),
    ("keyframe", [1]),
    ("tensor_names", "t0000"),
    ("tensor_names", ["t0000", "t0000"]),
    ("encodings", ["x"]),
]


@pytest.mark.parametrize(("name", "value"), HOSTILE_FIELDS, ids=[f"{n}={v!r}"[:40] for n, v in HOSTILE_FIELDS])
def test_hostile_header_fields_are_rejected_by_name(name, value):
    data = rewrite(
        encode([np.ones(2, np.float32)], UpdateHeader("n", seq=2, local_steps=4)),
        lambda fields: fields.update({name: value}),
    )
    error = _rejected(data, name if name != "node_id" else "node_id|not a plain name")
    assert name in error.reason


def test_own_work_at_base_cannot_exceed_the_total():
    data = rewrite(encode([np.ones(2, np.float32)], UpdateHeader("n", seq=2)), lambda f: f.update(base_own_seq=3))
    _rejected(data, "base_own_seq > seq")


@pytest.mark.parametrize(
    ("field_name", "value"),
    [("seq", -1), ("num_examples", 2**54), ("dataset_size", 0), ("local_steps", True), ("framework", "Torch!")],
)
def test_writer_refuses_headers_readers_would_reject(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        encode([np.ones(1)], UpdateHeader("n", **{field_name: value}))


# -- tensor names and compatibility -------------------------------------------------------------------------
def test_real_names_travel_and_name_the_mismatching_tensor():
    names = ["dense/kernel", "dense/bias", "out/kernel"]
    data = encode(
        [np.ones((3, 4), np.float32), np.ones(4, np.float32), np.ones((4, 2), np.float32)],
        UpdateHeader("n"),
        names=names,
    )
    assert decode(data, "k").names == names
    expected = [((3, 4), np.float32), ((4,), np.float32), ((4, 3), np.float32)]
    error = _rejected(data, "tensor 2 \\(out/kernel\\) is float32\\[4, 2\\]", expected=expected)
    assert "dense/kernel" not in error.reason
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert sorted(safetensors_numpy.load(data)) == sorted(names)


def test_check_compatible_explains_why_not():
    names = ["fc.weight", "fc.bias"]
    update = decode(
        encode(
            [np.ones((2, 3), np.float32), np.ones(2, np.float32)], UpdateHeader("n", framework="torch"), names=names
        ),
        "k",
    )
    same = [((2, 3), np.float32), ((2,), np.float32)]
    assert check_compatible(update, same, names, framework="torch") is None
    assert check_compatible(update, same) is None  # no names or framework given: only specs are compared
    reason = check_compatible(update, same, framework="keras")
    assert "torch" in reason and "keras" in reason and "refusing to mix" in reason
    reason = check_compatible(update, [((2, 3), np.float16), ((2,), np.float32)])
    assert "tensor 0 (fc.weight) is float32[2, 3], the local model has float16[2, 3]" in reason
    assert "precision" in reason
    assert "transposed" in check_compatible(update, [((3, 2), np.float32), ((2,), np.float32)])
    assert "has 2 tensors, the local model has 1" in check_compatible(update, same[:1])
    reason = check_compatible(update, same, ["fc.weight", "head.bias"])
    assert "tensor 1 is 'fc.bias', the local model's is 'head.bias'" in reason
    unnamed = decode(encode([np.ones(2, np.float32)], UpdateHeader("n")), "k")
    assert check_compatible(unnamed, [((2,), np.float32)], ["anything"]) is None  # default names mean nothing


def test_decode_refuses_a_foreign_layout_family():
    data = encode([np.ones((2, 2), np.float32)], UpdateHeader("n", framework="keras"))
    _rejected(data, "refusing to mix", framework="torch")
    assert decode(data, "k", framework="keras").header.framework == "keras"


# -- the payload hash ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_payload_hash_algorithms(algorithm):
    arrays = _arrays()
    data = encode(arrays, UpdateHeader("n"), payload_hash=algorithm)
    fields, _, payload = split(data)
    digest = hashlib.sha256(payload).hexdigest() if algorithm == "sha256" else blake3.blake3(payload).hexdigest()
    assert fields["payload_hash"] == f"{algorithm}:{digest}" and "payload_sha256" not in fields
    decoded = decode(data, "k")
    assert decoded.payload_hash == fields["payload_hash"] == object_ref(data).payload_hash
    corrupted = bytearray(data)
    corrupted[-9] ^= 1
    _rejected(bytes(corrupted), "checksum")


def test_big_payloads_hash_with_threads_and_still_match():
    array = np.random.default_rng(1).standard_normal(3_000_000).astype(np.float32)  # 12 MB: threaded BLAKE3
    data = encode([array], UpdateHeader("n"))
    assert split(data)[0]["payload_hash"] == "blake3:" + blake3.blake3(array.tobytes()).hexdigest()
    assert np.array_equal(decode(data, "k").arrays[0], array)


def test_swapping_the_hash_algorithm_is_caught():
    data = encode([np.ones(3, np.float32)], UpdateHeader("n"))
    swapped = rewrite(data, lambda f: f.update(payload_hash="sha256:" + f["payload_hash"].split(":")[1]))
    _rejected(swapped, "checksum")


def test_signature_covers_typed_fields_and_hash():
    signed = encode([np.ones(3, np.float32)], UpdateHeader("n", seq=3), secret=b"k")
    _rejected(rewrite(signed, lambda f: f.update(seq=2)), "bad signature", secret=b"k")
    _rejected(rewrite(signed, lambda f: f.update(payload_hash="sha256:" + "0" * 64)), "bad signature", secret=b"k")


def test_encode_parts_does_not_copy_tensors():
    array = np.arange(12, dtype=np.float32)
    parts = encode_parts([array], UpdateHeader("n"))
    assert b"".join(parts) == encode([array], UpdateHeader("n", timestamp=split(b"".join(parts))[0]["timestamp"]))
    assert np.shares_memory(np.frombuffer(parts[-1], np.float32), array)
