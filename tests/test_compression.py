"""Compressed updates: each encoding decodes to the original dtype within its error bound, top-k deltas need
the state they follow on their chain, and every hostile claim in a compressed object is rejected with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
from objects import rewrite

from flwr_serverless.errors import InvalidObjectError, KeyframeRequiredError
from flwr_serverless.node.publisher import UpdateWriter
from flwr_serverless.wire.codec import DecodedUpdate, UpdateHeader, decode, encode, object_ref
from flwr_serverless.wire.compression import (
    SEP,
    EncodedTensor,
    dequantize_int8,
    from_bf16_bits,
    pack_indices,
    parse_compression,
    quantize_int8,
    sparse_delta,
    to_bf16_bits,
    unpack_indices,
)
from flwr_serverless.wire.topk import TopKCompressor


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


@pytest.mark.parametrize(
    ("codec", "tolerance", "ratio"), [("fp16", 1e-3, 0.51), ("bf16", 8e-3, 0.51), ("int8", 8e-3, 0.27)]
)
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
    loaded = safetensors_numpy.load(
        encode(arrays, UpdateHeader("n"), names=["w", "b", "v", "i", "m"], compression="int8")
    )
    assert loaded["w"].dtype == np.int8 and loaded["w::scales"].dtype == np.float32
    assert np.array_equal(loaded["i"], arrays[3])
    assert safetensors_numpy.load(encode(arrays, UpdateHeader("n"), compression="bf16"))["t0000"].dtype == np.uint16


@pytest.mark.parametrize(
    ("option", "match"),
    [("fp8", "use None"), ("topk:0", r"\(0, 0.5\)"), ("topk:x", r"\(0, 0.5\)"), ("topk:0.6", r"\(0, 0.5\)")],
)
def test_bad_compression_options_name_the_option(option, match):
    with pytest.raises(ValueError, match=match):
        parse_compression(option)
    with pytest.raises(ValueError, match="compression="):
        encode([np.ones(2, np.float32)], UpdateHeader("n"), compression=option)
    assert parse_compression("topk:0.01") == ("topk", 0.01)


def test_topk_is_refused_without_a_compressor():
    with pytest.raises(ValueError, match="TopKCompressor"):
        encode([np.ones(2, np.float32)], UpdateHeader("n"), compression="topk:0.1")


# -- top-k deltas on a chain ------------------------------------------------------------------------------------
class Chain:
    """A writer (the real ``UpdateWriter``) publishing into a dict: what ``put_first`` stored, and each object."""

    def __init__(self, option: str = "topk:0.05", secret: bytes | None = None, **options: object) -> None:
        self.writer = UpdateWriter(option, **options)  # type: ignore[arg-type]
        self.secret = secret
        self.side: dict[str, bytes] = {}
        self.seq = 0

    def publish(self, arrays: list[np.ndarray]) -> bytes:
        self.seq += 1
        parts = self.writer.encode(arrays, UpdateHeader("w", seq=self.seq), None, self.secret, self._put).parts
        data = b"".join(bytes(p) for p in parts)
        self.writer.published("nodes/w", lambda source, target: self.side.__setitem__(target, data))
        return data

    def _put(self, key: str, data: object) -> None:
        self.side[key] = b"".join(bytes(p) for p in data) if isinstance(data, list) else bytes(data)  # type: ignore


def test_a_chain_rebuilds_the_writers_state_bit_for_bit_from_each_predecessor():
    chain, base = Chain("topk:0.05"), _model()
    first = chain.publish(base)
    keyframe = decode(chain.side["keyframes/w"], "keyframes/w")
    assert keyframe.chain is None and len(first) < 2500  # position 0: an empty delta naming the keyframe
    assert keyframe.encodings == {"t0000": "int8", "t0001": "int8", "t0002": "int8"}  # the default keyframe codec
    state = decode(first, "nodes/w", base=keyframe)
    assert state.chain == 0 and _same(state.arrays, keyframe.arrays) and _same(state.arrays, chain.writer.seen(base))
    assert np.abs(state.arrays[0] - base[0]).max() < 0.01 * np.abs(base[0]).max()
    rng, weights = np.random.default_rng(1), base
    for index in range(1, 6):
        weights = [
            a + (rng.standard_normal(a.shape) * 0.01).astype(a.dtype) if a.dtype.kind == "f" else a for a in weights
        ]
        data = chain.publish(weights)
        assert chain.side[f"deltas/w/{index:08d}"] == data  # logged once published
        assert len(data) < len(encode(weights, UpdateHeader("w"))) / 8
        with pytest.raises(KeyframeRequiredError) as info:
            decode(data, "nodes/w", base=keyframe if index > 1 else None)
        assert info.value.chain == index and info.value.ref == keyframe.position()[0]
        state = decode(data, "nodes/w", expected=_spec(base), base=state)
        assert state.chain == index and state.encodings == {"t0000": "delta", "t0001": "delta", "t0002": "delta"}
        assert _same(state.arrays, chain.writer.seen(weights))  # exactly what the writer says readers hold
        assert _same(state.arrays[3:], weights[3:])  # integer and boolean tensors travel raw
        assert not _same(state.arrays[:1], weights[:1])  # 5% of a dense drift: lossy
    assert chain.writer.topk.last_error < 0.05


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("codec", ["lossless", "fp16", "bf16", "int8"])
def test_the_keyframe_codec_is_chosen_and_error_feedback_sends_what_it_rounded(codec):
    base = [np.random.default_rng(3).standard_normal(3000).astype(np.float32)]
    chain = Chain("topk:0.2", topk_keyframe=codec)  # k = 600: five deltas cover every entry
    keyframe = decode(chain.side["keyframes/w"], "k") if chain.publish(base) else None
    assert keyframe.encodings == ({} if codec == "lossless" else {"t0000": codec})
    state = decode(chain.publish(base), "n", base=keyframe)
    first = np.abs(state.arrays[0] - base[0]).max()
    assert (first == 0) == (codec == "lossless")
    for _ in range(6):
        state = decode(chain.publish(base), "n", base=state)
    assert np.abs(state.arrays[0] - base[0]).max() <= first / 100


def test_error_feedback_sends_what_was_left_out_later():
    chain = Chain("topk:0.001", topk_keyframe_every=100, topk_keyframe="lossless")  # k = 2 of 2000
    current = np.zeros(2000, np.float32)
    state = decode(chain.publish([current]), "n", base=decode(chain.side["keyframes/w"], "k"))
    current[[0, 1, 7]] = [5.0, 4.0, 0.5]  # 0.5 ranks third: left out
    state = decode(chain.publish([current.copy()]), "n", base=state)
    assert state.arrays[0][[0, 1, 7]].tolist() == [5.0, 4.0, 0.0]
    state = decode(chain.publish([current.copy()]), "n", base=state)  # nothing else moved: now it goes
    assert state.arrays[0][7] == 0.5 and _same(state.arrays, [current])
    current[9] = 0.1  # not a float16 number: the rounding stays in W - R and is sent next time
    state = decode(chain.publish([current.copy()]), "n", base=state)
    first_error = abs(float(state.arrays[0][9]) - 0.1)
    assert 0 < first_error < 1e-4
    state = decode(chain.publish([current.copy()]), "n", base=state)
    assert abs(float(state.arrays[0][9]) - float(np.float32(0.1))) < first_error


def test_a_new_keyframe_starts_every_k_deltas_on_a_shape_change_and_on_drift():
    compressor = TopKCompressor(0.01, keyframe_every=3, max_error=0.5)
    arrays = [np.ones(1000, np.float32)]
    assert compressor.compress(arrays) is None  # no keyframe yet
    compressor.set_keyframe(arrays, object_ref(encode(arrays, UpdateHeader("w", seq=1))))
    for index in range(1, 4):
        pending = compressor.compress(arrays)
        assert pending is not None and pending.chain == index
        compressor.commit(pending)
    assert compressor.compress(arrays) is None  # keyframe_every reached
    compressor.set_keyframe(arrays, object_ref(encode(arrays, UpdateHeader("w", seq=5))))
    assert compressor.compress([np.full(1000, 3.0, np.float32)]) is None  # every entry moved: error ~1
    assert compressor.compress([np.ones((10, 100), np.float32)]) is None  # the model changed shape
    pending = compressor.compress(arrays)
    compressor.reset()  # its upload failed: a new chain starts
    assert pending is not None and compressor.compress(arrays) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 0.5}, "fraction"),
        ({"fraction": 0.1, "keyframe_every": 0}, "keyframe_every"),
        ({"fraction": 0.1, "keyframe_every": 2000}, "keyframe_every"),
        ({"fraction": 0.1, "keyframe_every": True}, "keyframe_every"),
        ({"fraction": 0.1, "max_error": float("nan")}, "max_error"),
    ],
)
def test_topk_compressor_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKCompressor(**kwargs)


def _keyframe_and_delta(chain: int = 1, **parts: np.ndarray) -> tuple[DecodedUpdate, bytes]:
    keyframe_object = encode([np.zeros(10, np.float32)], UpdateHeader("w", seq=1))
    delta = EncodedTensor("delta", np.dtype("<f4"), (10,), {SEP + k: v for k, v in parts.items()})
    data = encode([delta], UpdateHeader("w", seq=2), keyframe=object_ref(keyframe_object), chain=chain)
    return decode(keyframe_object, "keyframes/w"), data


@pytest.mark.parametrize(
    ("indices", "values", "match"),
    [
        ([3, 3], [1.0, 2.0], "strictly increasing"),
        ([5, 2], [1.0, 2.0], "strictly increasing"),
        ([2, 10], [1.0, 2.0], "below 10"),
        ([1, 2, 3], [1.0, 2.0], r"expected F16/F32\[3\]"),
        (list(range(11)), [1.0] * 11, "11 entries for a tensor of 10"),
        ([1], [float("nan")], "NaN or Inf"),
    ],
)
def test_hostile_delta_parts(indices, values, match):
    keyframe, data = _keyframe_and_delta(indices=np.array(indices, np.uint16), values=np.array(values, np.float32))
    _rejected(data, match, base=keyframe)


def test_delta_index_and_value_dtypes_are_checked():
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.int32), values=np.array([1.0], np.float32))
    _rejected(data, "expected U16/U32/U64", base=keyframe)
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint32), values=np.array([1.0], np.float64))
    _rejected(data, r"expected F16/F32\[1\]", base=keyframe)
    for index_dtype, value_dtype in ((np.uint16, np.float16), (np.uint64, np.float32)):
        keyframe, data = _keyframe_and_delta(indices=np.array([1], index_dtype), values=np.array([2.0], value_dtype))
        assert decode(data, "nodes/w", base=keyframe).arrays[0].tolist() == [0, 2.0] + [0] * 8


def test_a_delta_applies_only_to_the_state_it_follows():
    keyframe, data = _keyframe_and_delta(chain=1, indices=np.array([1], np.uint16), values=np.array([1.0], np.float32))
    other = decode(encode([np.zeros(10, np.float32)], UpdateHeader("w", seq=9)), "k")
    with pytest.raises(KeyframeRequiredError):
        decode(data, "nodes/w", base=other)  # another chain
    state = decode(data, "nodes/w", base=keyframe)
    _, second = _keyframe_and_delta(chain=3, indices=np.array([2], np.uint16), values=np.array([1.0], np.float32))
    with pytest.raises(KeyframeRequiredError):
        decode(second, "nodes/w", base=state)  # position 3 follows 2, not 1
    impostor = DecodedUpdate(UpdateHeader("x", seq=1), keyframe.names, keyframe.arrays, keyframe.payload_hash)
    _rejected(data, "same node", base=impostor)
    quantized = DecodedUpdate(
        keyframe.header, keyframe.names, keyframe.arrays, keyframe.payload_hash, encodings={"t0000": "int8"}
    )
    assert quantized.position() == keyframe.position()  # any whole model can start a chain
    assert state.arrays[0][1] == 1.0 and state.position() == (keyframe.position()[0], 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.update(keyframe=None), "both 'keyframe' and 'chain'"),
        (lambda f: f.update(chain=None), "both 'keyframe' and 'chain'"),
        (lambda f: f.update(chain=-1), "'chain' must be an integer"),
        (lambda f: f.update(chain=10**6), "'chain' must be an integer"),
        (lambda f: f.update(chain=True), "'chain' must be an integer"),
        (lambda f: f.update(chain=0), "position 0 is the keyframe itself"),
        (lambda f: f["keyframe"].update(seq="1"), "'keyframe' must be"),
    ],
)
def test_hostile_chain_fields(change, match):
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint16), values=np.array([1.0], np.float32))
    _rejected(rewrite(data, change), match, base=keyframe)


def _int8_object(q: np.ndarray, scales: np.ndarray, shape: tuple[int, ...] = (10,), chunk: int = 4) -> bytes:
    tensor = EncodedTensor("int8", np.dtype("<f4"), shape, {"": q, SEP + "scales": scales}, chunk)
    return encode([tensor], UpdateHeader("n"))


@pytest.mark.parametrize(
    ("scales", "match"),
    [
        ([1.0, float("nan"), 1.0], "scales must be finite"),
        ([1.0, -1.0, 1.0], "non-negative"),
        ([1.0, 1e38, 1.0], "at most"),
        ([1.0, 1.0], r"expected F32\[3\]"),
    ],
)
def test_hostile_int8_scales(scales, match):
    _rejected(_int8_object(np.ones(10, np.int8), np.array(scales, np.float32)), match)


def test_hostile_int8_shapes_and_chunks():
    _rejected(_int8_object(np.ones(9, np.int8), np.ones(3, np.float32)), r"expected I8\[10\]")
    data = _int8_object(np.ones(10, np.int8), np.ones(3, np.float32))
    _rejected(rewrite(data, lambda f: f["encodings"]["t0000"].update(chunk=0)), "chunk must be")
    _rejected(rewrite(data, lambda f: f["encodings"]["t0000"].update(chunk=True)), "chunk must be")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"codec": "zstd"}, "must name a codec"),
        ({"dtype": "I32"}, "must be a float type"),
        ({"dtype": 5}, "must be a float type"),
        ({"shape": [2**30, 2**30, 2**30]}, "elements"),
        ({"shape": [-1]}, "shape must be"),
        ({"shape": "10"}, "shape must be"),
        ({"extra_field": 1}, "has fields"),
    ],
)
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


def test_a_delta_shape_must_match_its_base_before_anything_is_allocated():
    keyframe, data = _keyframe_and_delta(indices=np.array([1], np.uint16), values=np.array([1.0], np.float32))
    huge = rewrite(data, lambda f: f["encodings"]["t0000"].update(shape=[2**20, 2**19]))
    _rejected(huge, "state it applies to does not match", base=keyframe)
    _rejected(huge, "the local model has", base=keyframe, expected=[((10,), np.float32)])


def test_part_names_cannot_collide():
    with pytest.raises(ValueError, match="collides"):
        encode(
            [np.ones(10, np.float32), np.ones(3, np.float32)],
            UpdateHeader("n"),
            names=["w", "w::scales"],
            compression="int8",
        )


@pytest.mark.parametrize(("size", "k"), [(200_000, 2_000), (200_000, 60_000), (3_000, 30), (50, 49)])
def test_sparse_selection_is_the_exact_top_k(size, k):
    residual = np.random.default_rng(size + k).standard_t(3, size).astype(np.float32)
    indices, values = sparse_delta(residual, k)
    moved = np.abs(residual)
    assert indices.dtype == (np.uint16 if size <= 65536 else np.uint32)
    assert np.array_equal(indices, np.sort(np.argpartition(moved, size - k)[-k:]))
    assert values.dtype == np.float16 and np.array_equal(values, residual[indices].astype(np.float16))


def test_unchanged_entries_are_never_sent_and_big_values_keep_their_precision():
    residual = np.zeros(100_000, np.float32)
    residual[[5, 70_000]] = [1.0, -2.0]
    indices, values = sparse_delta(residual, 1000)
    assert indices.tolist() == [5, 70_000] and values.tolist() == [1.0, -2.0]
    residual[5] = 1e6  # beyond float16: the values stay float32
    assert sparse_delta(residual, 1000)[1].dtype == np.float32


def test_signed_deltas_cover_their_chain_position():
    chain, base = Chain("topk:0.01", secret=b"s"), np.ones(5000, np.float32)
    state = decode(
        chain.publish([base]),
        "nodes/w",
        secret=b"s",
        base=decode(chain.side["keyframes/w"], "keyframes/w", secret=b"s"),
    )
    moved = base.copy()
    moved[:10] += 0.25
    delta = chain.publish([moved])
    assert np.array_equal(decode(delta, "nodes/w", secret=b"s", base=state).arrays[0], moved)
    for change in (lambda f: f["keyframe"].update(seq=7), lambda f: f.update(chain=2)):
        _rejected(rewrite(delta, change), "bad signature", secret=b"s", base=state)
    with pytest.raises(ValueError, match="keyframe= and chain="):
        encode(
            [
                EncodedTensor(
                    "delta",
                    np.dtype("<f4"),
                    (3,),
                    {SEP + "indices": np.zeros(0, np.uint16), SEP + "values": np.zeros(0, np.float16)},
                )
            ],
            UpdateHeader("w", seq=3),
        )


def test_indices_of_large_tensors_travel_as_u16_gaps_when_they_fit():
    size = 200_000
    spread = np.arange(0, size, 100, dtype=np.uint32)  # gaps of 100
    stored, gaps = pack_indices(spread, size)
    assert gaps and stored.dtype == np.uint16 and np.array_equal(unpack_indices(stored, gaps), spread)
    far = np.array([3, 70_000], np.uint32)  # one gap past 65,535: absolute U32
    stored, gaps = pack_indices(far, size)
    assert not gaps and stored.dtype == np.uint32
    small = np.array([3, 60_000], np.uint32)
    assert pack_indices(small, 65_536)[0].dtype == np.uint16 and not pack_indices(small, 65_536)[1]

    chain = Chain("topk:0.01", topk_keyframe="lossless")
    base = [np.random.default_rng(5).standard_normal(size).astype(np.float32)]
    state = decode(chain.publish(base), "n", base=decode(chain.side["keyframes/w"], "k"))
    moved = [base[0] + 0.1 * np.random.default_rng(6).standard_normal(size).astype(np.float32)]
    data = chain.publish(moved)
    state = decode(data, "n", base=state)
    assert _same(state.arrays, chain.writer.seen(moved))
    spec = json.loads(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["flwr_serverless"])
    assert spec["encodings"]["t0000"]["gaps"] is True
    assert len(data) < 2000 * (2 + 2) + 2000  # 2,000 entries of U16 gap + F16 value, plus the header


def _gap_object(
    gaps: list[int],
    size: int = 70_000,
    spec: dict[str, object] | None = None,
) -> tuple[DecodedUpdate, bytes]:
    keyframe_object = encode([np.zeros(size, np.float32)], UpdateHeader("w", seq=1))
    delta = EncodedTensor(
        "delta",
        np.dtype("<f4"),
        (size,),
        {SEP + "indices": np.array(gaps, np.uint16), SEP + "values": np.ones(len(gaps), np.float16)},
        gaps=True,
    )
    data = encode([delta], UpdateHeader("w", seq=2), keyframe=object_ref(keyframe_object), chain=1)
    if spec:
        data = rewrite(data, lambda f: f["encodings"]["t0000"].update(spec))  # type: ignore[arg-type]
    return decode(keyframe_object, "keyframes/w"), data


@pytest.mark.parametrize(
    ("gaps", "spec", "match"),
    [
        ([5, 0], {}, "gaps after the first must be positive"),
        ([60_000, 60_000], {}, "below 70000"),
        ([5, 6], {"gaps": False}, "gaps, when present, must be true"),
        ([5, 6], {"gaps": 1}, "gaps, when present, must be true"),
    ],
)
def test_hostile_index_gaps(gaps, spec, match):
    keyframe, data = _gap_object(gaps, spec=spec)
    _rejected(data, match, base=keyframe)


def test_index_gaps_decode_and_must_be_u16():
    keyframe, data = _gap_object([0, 5, 65_535])
    assert np.flatnonzero(decode(data, "n", base=keyframe).arrays[0]).tolist() == [0, 5, 65_540]
    keyframe_object = encode([np.zeros(70_000, np.float32)], UpdateHeader("w", seq=1))
    delta = EncodedTensor(
        "delta",
        np.dtype("<f4"),
        (70_000,),
        {SEP + "indices": np.array([1], np.uint32), SEP + "values": np.ones(1, np.float16)},
        gaps=True,
    )
    data = encode([delta], UpdateHeader("w", seq=2), keyframe=object_ref(keyframe_object), chain=1)
    _rejected(data, "is U32.1., expected U16 with one dimension", base=decode(keyframe_object, "k"))
