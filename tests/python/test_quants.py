"""The block formats' reference conversions against the `gguf` package (llama.cpp's numpy port).

Every dequantiser must give gguf.quants.dequantize's float32 values bit for bit on random blocks
(random integers, random finite f16 scales); the quantisers must round-trip within the format's
error, and no worse than gguf's own quantiser where it has one.
"""

import gguf
import gguf.quants
import numpy as np
import pytest

from opencamp import _core

QTYPES = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
    "q4_k": gguf.GGMLQuantizationType.Q4_K,
    "q5_k": gguf.GGMLQuantizationType.Q5_K,
    "q6_k": gguf.GGMLQuantizationType.Q6_K,
}
# Byte offsets of each format's f16 scale fields within a block (ggml-common.h).
F16_FIELDS = {
    "q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2],
    "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
}


def random_blocks(name, n_blocks, rng):
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[QTYPES[name]]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_format_table_matches_gguf():
    table = {d["name"]: d for d in _core.dtypes()}
    for name, qtype in QTYPES.items():
        block_elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        assert (table[name]["block_elements"], table[name]["block_bytes"]) == (block_elements, block_bytes)
    assert table["bf16"]["block_bytes"] == 2 and table["f32"]["block_elements"] == 1


@pytest.mark.parametrize("name", list(QTYPES))
def test_dequantize_is_bit_identical_to_gguf(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    blocks = random_blocks(name, 64, rng)
    ours = _core.dequantize(blocks.reshape(-1), name)
    theirs = gguf.quants.dequantize(blocks, QTYPES[name]).reshape(-1).astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    mismatched = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
    assert mismatched.size == 0, f"{name}: {mismatched.size} values differ, first at {mismatched[:5]}: " \
                                 f"{ours[mismatched[:5]]} vs {theirs[mismatched[:5]]}"


@pytest.mark.parametrize("name", list(QTYPES))
def test_quantize_round_trips_within_the_formats_error(name):
    rng = np.random.default_rng(1)
    values = (rng.standard_normal(256 * 32) * 0.05).astype(np.float32)
    blocks = _core.quantize(values, name)
    back = _core.dequantize(blocks, name)
    error = np.linalg.norm(back - values) / np.linalg.norm(values)
    # Our own dequantiser reads what gguf's reads: the blocks are real gguf blocks.
    theirs = gguf.quants.dequantize(blocks.reshape(-1, gguf.GGML_QUANT_SIZES[QTYPES[name]][1]),
                                    QTYPES[name]).reshape(-1)
    assert np.array_equal(back, theirs)
    try:
        reference = gguf.quants.dequantize(gguf.quants.quantize(values.reshape(32, 256), QTYPES[name]),
                                           QTYPES[name]).reshape(-1)
    except NotImplementedError:  # gguf has no quantiser for the K formats
        bound = {"q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[name]
        assert error < bound, f"{name}: relative error {error:.4f}"
        return
    reference_error = np.linalg.norm(reference - values) / np.linalg.norm(values)
    assert error <= reference_error * 1.05, f"{name}: {error:.4f} vs gguf's {reference_error:.4f}"


def test_bad_input_is_refused():
    with pytest.raises(_core.OpencampError, match="unknown dtype"):
        _core.dequantize(np.zeros(34, np.uint8), "q3_k")
    with pytest.raises(_core.OpencampError, match="whole q8_0 blocks"):
        _core.dequantize(np.zeros(33, np.uint8), "q8_0")
    with pytest.raises(_core.OpencampError, match="blocks of 256"):
        _core.quantize(np.zeros(100, np.float32), "q4_k")
