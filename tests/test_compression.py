"""Compressed updates: each encoding decodes to the original dtype within its error bound, top-k deltas need
the right keyframe, and every hostile claim in a compressed object is rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from objects import rewrite

from flwr_serverless.codec import DecodedUpdate, UpdateHeader, decode, encode, object_ref
from flwr_serverless.compression import (
    SEP,
    EncodedTensor,
    dequantize_int8,
    from_bf16_bits,
    parse_compression,
    quantize_int8,
    sparse_encode,
    to_bf16_bits,
)
from flwr_serverless.errors import InvalidObjectError, KeyframeRequiredError
from flwr_serverless.topk import TopKCompressor


def _model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((64, 80)).astype(np.float32),
        rng.standard_normal(80).astype(np.float32),
        rng.standard_normal((80, 10)),  # float64
        np.arange(7, dtype=np.int64),
        np.array([True, False]),
    ]


def _spec(arrays: list[np.ndarray]) -> list[tuple[tuple[int, ...], np.dtype]]:
    return [(a.shape, a.dtype) for a in arrays]


def _rejected(data: bytes, match: str, **kwargs) -> InvalidObjectError:
    with pytest.raises(InvalidObjectError, match=match) as info:
        decode(data, "nodes/peer", **kwargs)
    assert info.value.key == "nodes/peer"
    return info.value


@pytest.mark.parametrize(("codec", "tolerance", "ratio"), [("fp16", 1e-3, 0.51), ("bf16", 8e-3, 0.51),
                                                          ("int8", 8e-3, 0.27)])
def test_stateless_codecs_restore_dtype_and_shape_within_their_error(codec, tolerance, ratio):
    arrays = _model()
    data = encode(arrays, UpdateHeader("n"), compression=codec)
    raw = encode(arrays, UpdateHeader("n"))
    decoded = decode(data, "k", expected=_spec(arrays))
    assert set(decoded.encodings) == {"t0000", "t0001", "t0002"} and not decoded.lossless
    for original, back in zip(arrays, decoded.arrays):
        assert back.dtype == original.dtype and back.shape == original.shape
        if original.dtype.kind == "f":
            relative = np.abs(back - original).max() / np.abs(original).max()
            assert 0 < relative <= tolerance
        else:
            assert np.array_equal(back, original)  # integer and boolean tensors are never compressed
    float_bytes = sum(a.nbytes for a in arrays if a.dtype.kind == "f")
    assert len(raw) - len(data) >= (1 - ratio) * float_bytes


def test_fp16_keeps_tensors_beyond_its_range_raw():
    big = np.array([1.0, 7e4], np.float32)
    decoded = decode(encode([big, np.ones(3, np.float32)], UpdateHeader("n"), compression="fp16"), "k")
    assert decoded.encodings == {"t0001": "fp16"} and np.array_equal(decoded.arrays[0], big)


def test_bf16_rounds_like_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(3).standard_normal(10_000).astype(np.float32) * 1e3
    values[:4] = [1.00390625, 1.01171875, -2.5, 0.0]  # ties to even, both directions
    ours = from_bf16_bits(to_bf16_bits(values))
    reference = values.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 10_000, 2_100_000])
def test_int8_chunks_cover_every_element(size):
    x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    x[-1] = 50.0  # an outlier only widens the last chunk's scale
    q, scales = quantize_int8(x, 4096)
    assert q.dtype == np.int8 and scales.shape == (-(-size // 4096),)
    back = dequantize_int8(q, scales, 4096, np.dtype(np.float32))
    per_element_scale = np.repeat(scales, 4096)[:size]
    assert np.all(np.abs(back - x) <= per_element_scale / 2 + 1e-6)
    assert scales[-1] == np.float32(50.0) / np.float32(127) and back[-1] == pytest.approx(50.0)
    if size > 4096:
        assert scales[0] < 0.05


def test_int8_of_zeros_is_exact():
    q, scales = quantize_int8(np.zeros(5000, np.float32), 4096)
    assert not q.any() and not scales.any()


def test_compressed_objects_are_valid_safetensors():
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = _model()
    loaded = safetensors_numpy.load(encode(arrays, UpdateHeader("n"), names=["w", "b", "v", "i", "m"],
                                           compression="int8"))
    assert loaded["w"].dtype == np.int8 and loaded["w::scales"].dtype == np.float32
    assert np.array_equal(loaded["i"], arrays[3])
    assert safetensors_numpy.load(encode(arrays, UpdateHeader("n"), compression="bf16"))["t0000"].dtype == np.uint16


@pytest.mark.parametrize(("option", "match"), [("fp8", "use None"), ("topk:0", r"\(0, 0.5\)"),
                                               ("topk:x", r"\(0, 0.5\)"), ("topk:0.6", r"\(0, 0.5\)")])
def test_bad_compression_options_name_the_option(option, match):
    with pytest.raises(ValueError, match=match):
        parse_compression(option)
    with pytest.raises(ValueError, match="compression="):
        encode([np.ones(2, np.float32)], UpdateHeader("n"), compression=option)
    assert parse_compression("topk:0.01") == ("topk", 0.01)


def test_topk_is_refused_without_a_compressor():
    with pytest.raises(ValueError, match="TopKCompressor"):
        encode([np.ones(2, np.float32)], UpdateHeader("n"), compression="topk:0.1")


# -- top-k deltas against a keyframe ----------------------------------------------------------------------------
def _publish(compressor: TopKCompressor, arrays: list[np.ndarray], seq: int) -> tuple[bytes, bytes | None]:
    """What a node does (see the compression module docstring): (nodes/<id> object, keyframes/<id> object)."""
    header = UpdateHeader("w", seq=seq)
    encoded, full = compressor.compress(arrays), None
    if encoded is None:
        full = encode(arrays, header)
        compressor.set_keyframe(arrays, object_ref(full))
        encoded = compressor.compress(arrays)
    return encode(encoded, header, keyframe=compressor.keyframe_ref), full


def test_topk_delta_needs_its_keyframe_and_rebuilds_the_sent_entries_exactly():
    base = _model()
    compressor = TopKCompressor(0.05, min_size=100)
    first, keyframe_object = _publish(compressor, base, 1)
    keyframe = decode(keyframe_object, "keyframes/w")
    assert keyframe.lossless and compressor.keyframe_ref == object_ref(keyframe_object)
    assert len(first) < 2000  # an empty delta: only the small tensors travel
    assert all(np.array_equal(a, b) for a, b in zip(decode(first, "nodes/w", keyframe=keyframe).arrays, base))
    moved = [a.copy() for a in base]
    moved[0][3, 4] += 1.0
    moved[0][10:20] += 0.001  # a small drift of 800 entries: k = 256, so most of it is left out
    moved[1][:] += 0.5  # 80 elements, below min_size: travels raw
    delta, no_keyframe = _publish(compressor, moved, 2)
    assert no_keyframe is None and len(delta) < len(keyframe_object) / 3
    with pytest.raises(KeyframeRequiredError) as info:
        decode(delta, "nodes/w")
    assert info.value.ref == compressor.keyframe_ref and "keyframe seq 1" in info.value.reason
    decoded = decode(delta, "nodes/w", expected=_spec(base), keyframe=keyframe)
    assert decoded.encodings == {"t0000": "topk", "t0002": "topk"} and decoded.keyframe.seq == 1
    assert decoded.arrays[0][3, 4] == moved[0][3, 4]
    assert np.array_equal(decoded.arrays[1], moved[1]) and np.array_equal(decoded.arrays[2], base[2])
    assert np.array_equal(decoded.arrays[3], base[3])
    sent = np.flatnonzero(decoded.arrays[0] != base[0])
    assert 1 <= sent.size <= compressor.fraction * base[0].size + 1
    assert compressor.residual_norms[0] > 0 and compressor.last_error < compressor.max_error


def test_topk_error_feedback_sends_what_accumulates():
    base = [np.zeros(2000, np.float32)]
    compressor = TopKCompressor(0.001, keyframe_every=100, max_error=10.0, min_size=0)  # k = 2
    keyframe = decode(_publish(compressor, base, 1)[1], "k")
    current = base[0].copy()
    current[0] = 5.0  # large, sent at once
    current[1] = 4.0
    seen = decode(_publish(compressor, [current], 2)[0], "k", keyframe=keyframe).arrays[0]
    assert seen[0] == 5.0 and seen[1] == 4.0
    current[7] = 0.5  # third largest: left out, but it stays in the next delta's candidates
    for step in range(3, 8):
        current[7] += 2.0  # keeps drifting: overtakes the others and is sent with its current value
        seen = decode(_publish(compressor, [current], step)[0], "k", keyframe=keyframe).arrays[0]
    assert seen[7] == current[7] == 10.5
    assert compressor.deltas_since_keyframe == 7  # the empty delta after the keyframe counts too


def test_topk_republishes_the_keyframe_every_k_deltas_and_when_the_error_grows():
    compressor = TopKCompressor(0.01, keyframe_every=3, max_error=0.5, min_size=0)
    arrays = [np.ones(1000, np.float32)]
    assert compressor.compress(arrays) is None  # no keyframe yet
    compressor.set_keyframe(arrays, object_ref(encode(arrays, UpdateHeader("w", seq=1))))
    assert all(compressor.compress(arrays) is not None for _ in range(3))
    assert compressor.compress(arrays) is None  # keyframe_every reached
    compressor.set_keyframe(arrays, object_ref(encode(arrays, UpdateHeader("w", seq=5))))
    assert compressor.compress([np.full(1000, 3.0, np.float32)]) is None  # every entry moved: error ~1
    assert compressor.compress([np.ones((10, 100), np.float32)]) is None  # the model changed shape


@pytest.mark.parametrize(("kwargs", "match"), [({"fraction": 0.0}, "fraction"), ({"fraction": 0.5}, "fraction"),
                                               ({"fraction": 0.1, "keyframe_every": 0}, "keyframe_every"),
                                               ({"fraction": 0.1, "max_error": float("nan")}, "max_error"),
                                               ({"fraction": 0.1, "min_size": -1}, "min_size")])
def test_topk_compressor_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKCompressor(**kwargs)


def _keyframe_and_delta(**parts: np.ndarray) -> tuple[DecodedUpdate, bytes]:
    keyframe_object = encode([np.zeros(10, np.float32)], UpdateHeader("w", seq=1))
    delta = EncodedTensor("topk", np.dtype("<f4"), (10,), {SEP + k: v for k, v in parts.items()})
    data = encode([delta], UpdateHeader("w", seq=2), keyframe=object_ref(keyframe_object))
    return decode(keyframe_object, "keyframes/w"), data


@pytest.mark.parametrize(("indices", "values", "match"), [
    ([3, 3], [1.0, 2.0], "strictly increasing"),
    ([5, 2], [1.0, 2.0], "strictly increasing"),
    ([2, 10], [1.0, 2.0], "below 10"),
    ([1, 2, 3], [1.0, 2.0], r"expected F32\[3\]"),
    (list(range(11)), [1.0] * 11, "11 entries for a tensor of 10"),
    ([1], [float("nan")], "NaN or Inf"),
])
def test_hostile_topk_parts(indices, values, match):
    keyframe, data = _keyframe_and_delta(indices=np.array(indices, np.uint32), values=np.array(values, np.float32))
    _rejected(data, match, keyframe=keyframe)


def test_topk_index_and_value_dtypes_are_checked():
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.int32), values=np.array([1.0], np.float32))
    _rejected(data, "expected U32/U64", keyframe=keyframe)
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint32), values=np.array([1.0], np.float64))
    _rejected(data, r"expected F32\[1\]", keyframe=keyframe)


def test_a_keyframe_must_be_the_named_lossless_object_of_the_same_node():
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint32), values=np.array([1.0], np.float32))
    other = decode(encode([np.zeros(10, np.float32)], UpdateHeader("w", seq=9)), "k")
    with pytest.raises(KeyframeRequiredError):
        decode(data, "nodes/w", keyframe=other)
    impostor = DecodedUpdate(UpdateHeader("x", seq=1), keyframe.names, keyframe.arrays, keyframe.payload_hash)
    _rejected(data, "same node", keyframe=impostor)
    lossy = DecodedUpdate(keyframe.header, keyframe.names, keyframe.arrays, keyframe.payload_hash,
                          encodings={"t0000": "int8"})
    _rejected(data, "lossless", keyframe=lossy)
    _rejected(rewrite(data, lambda f: f.update(keyframe=None)), "no 'keyframe'", keyframe=keyframe)
    assert decode(data, "nodes/w", keyframe=keyframe).arrays[0][1] == 1.0


def _int8_object(q: np.ndarray, scales: np.ndarray, shape: tuple[int, ...] = (10,), chunk: int = 4) -> bytes:
    tensor = EncodedTensor("int8", np.dtype("<f4"), shape, {"": q, SEP + "scales": scales}, chunk)
    return encode([tensor], UpdateHeader("n"))


@pytest.mark.parametrize(("scales", "match"), [([1.0, float("nan"), 1.0], "scales must be finite"),
                                               ([1.0, -1.0, 1.0], "non-negative"), ([1.0, 1e38, 1.0], "at most"),
                                               ([1.0, 1.0], r"expected F32\[3\]")])
def test_hostile_int8_scales(scales, match):
    _rejected(_int8_object(np.ones(10, np.int8), np.array(scales, np.float32)), match)


def test_hostile_int8_shapes_and_chunks():
    _rejected(_int8_object(np.ones(9, np.int8), np.ones(3, np.float32)), r"expected I8\[10\]")
    data = _int8_object(np.ones(10, np.int8), np.ones(3, np.float32))
    _rejected(rewrite(data, lambda f: f["encodings"]["t0000"].update(chunk=0)), "chunk must be")
    _rejected(rewrite(data, lambda f: f["encodings"]["t0000"].update(chunk=True)), "chunk must be")


@pytest.mark.parametrize(("change", "match"), [
    ({"codec": "zstd"}, "must name a codec"),
    ({"dtype": "I32"}, "must be a float type"),
    ({"dtype": 5}, "must be a float type"),
    ({"shape": [2**30, 2**30, 2**30]}, "elements"),
    ({"shape": [-1]}, "shape must be"),
    ({"shape": "10"}, "shape must be"),
    ({"extra_field": 1}, "has fields"),
])
def test_hostile_encoding_specs(change, match):
    data = encode([np.ones(10, np.float32)], UpdateHeader("n"), compression="fp16")
    _rejected(rewrite(data, lambda f: f["encodings"]["t0000"].update(change)), match)


def test_encodings_must_name_real_tensors():
    data = encode([np.ones(10, np.float32)], UpdateHeader("n"), compression="fp16")
    _rejected(rewrite(data, lambda f: f["encodings"].update(ghost=f["encodings"]["t0000"])), "'encodings'")
    # Without its encoding an fp16 tensor is a float16 tensor: the local float32 model refuses it.
    _rejected(rewrite(data, lambda f: f["encodings"].clear()), "float16", expected=[((10,), np.float32)])
    data = encode([np.ones(10, np.float32)], UpdateHeader("n"), compression="int8")
    _rejected(rewrite(data, lambda f: f["encodings"].clear()), "header and layout disagree")


def test_a_topk_shape_must_match_the_keyframe_before_anything_is_allocated():
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint32), values=np.array([1.0], np.float32))
    huge = rewrite(data, lambda f: f["encodings"]["t0000"].update(shape=[2**20, 2**19]))
    _rejected(huge, "keyframe's tensor does not match", keyframe=keyframe)
    _rejected(huge, "the local model has", keyframe=keyframe, expected=[((10,), np.float32)])


def test_part_names_cannot_collide():
    with pytest.raises(ValueError, match="collides"):
        encode([np.ones(10, np.float32), np.ones(3, np.float32)], UpdateHeader("n"), names=["w", "w::scales"],
               compression="int8")


@pytest.mark.parametrize(("size", "k"), [(200_000, 2_000), (200_000, 60_000), (3_000, 30), (50, 49)])
def test_sparse_selection_is_the_exact_top_k(size, k):
    rng = np.random.default_rng(size + k)
    keyframe = rng.standard_normal(size).astype(np.float32)
    current = keyframe + rng.standard_t(3, size).astype(np.float32)
    indices, values, sent, missed = sparse_encode(current, keyframe, k)
    moved = np.abs(current - keyframe)
    assert indices.dtype == np.uint32 and np.array_equal(indices, np.sort(np.argpartition(moved, size - k)[-k:]))
    assert np.array_equal(values, current[indices])
    assert sent + missed == pytest.approx(float(np.sum(moved.astype(np.float64) ** 2)), rel=1e-4)


def test_unchanged_entries_are_never_sent():
    keyframe = np.zeros(100_000, np.float32)
    current = keyframe.copy()
    current[[5, 70_000]] = [1.0, -2.0]
    indices, values, _, missed = sparse_encode(current, keyframe, 1000)
    assert indices.tolist() == [5, 70_000] and values.tolist() == [1.0, -2.0] and missed == 0.0


def test_signed_deltas_cover_the_keyframe_they_name():
    compressor = TopKCompressor(0.01, min_size=0)
    base = np.ones(5000, np.float32)
    _, keyframe_object = _publish(compressor, [base], 1)
    moved = base.copy()
    moved[:10] += 0.01
    encoded = compressor.compress([moved])
    assert encoded is not None and isinstance(encoded[0], EncodedTensor)
    delta = encode(encoded, UpdateHeader("w", seq=2), secret=b"s", keyframe=compressor.keyframe_ref)
    keyframe = decode(keyframe_object, "keyframes/w")
    assert np.array_equal(decode(delta, "nodes/w", secret=b"s", keyframe=keyframe).arrays[0], moved)
    forged = rewrite(delta, lambda f: f["keyframe"].update(seq=7))
    _rejected(forged, "bad signature", secret=b"s", keyframe=keyframe)
    with pytest.raises(ValueError, match="keyframe="):
        encode(encoded, UpdateHeader("w", seq=3))
