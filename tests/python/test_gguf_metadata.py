"""opencamp._core.read_gguf_metadata / gguf_tensors (the C++ GGUF reader) against the gguf
package's own reader, on a file written here with every value type and on the real SmolLM2 file."""
import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter, GGMLQuantizationType

from opencamp import _core
from conftest import SHARED, SMOLLM2, _require_shared


def gguf_reference_metadata(path):
    """Every key -> value as the gguf package reads it (arrays as lists)."""
    reader = GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's pseudo-fields (version, counts)
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            if field.types[-1] == GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[key] = [field.parts[i][0].item() for i in field.data]
        elif field.types[0] == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]][0].item()
    return out, reader


def as_plain(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "every-type.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.125)
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", False)
    w.add_string("t.string", "héllo ✓ 世界")
    w.add_array("t.strings", ["a", "", "ü"])
    w.add_array("t.f32s", [0.5, -1.5, 3.25])
    w.add_array("t.i32s", [1, -2, 3])
    w.add_tensor("m.weight", np.arange(24, dtype=np.float32).reshape(4, 6))
    w.add_tensor("q.weight", np.zeros((2, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_reads_as_the_gguf_package_reads_it(written):
    expected, _ = gguf_reference_metadata(written)
    got = _core.read_gguf_metadata(written)
    assert list(got) == list(expected)  # same keys, file order
    for key, value in expected.items():
        assert as_plain(got[key]) == value, key
    assert got["t.u64"] == 2**63 + 5 and type(got["t.u64"]) is int
    assert got["t.bool"] is False
    assert got["t.string"] == "héllo ✓ 世界"
    assert isinstance(got["t.f32s"], np.ndarray) and got["t.f32s"].dtype == np.float32
    assert got["t.i32s"].dtype == np.int32
    assert got["t.strings"] == ["a", "", "ü"]


def test_tensor_list(written):
    assert _core.gguf_tensors(written) == [("m.weight", "F32", [4, 6]), ("q.weight", "Q8_0", [2, 32])]


def test_errors_name_the_file(tmp_path, written):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(written.read_bytes()[:100])
    with pytest.raises(_core.OpencampError, match="broken.gguf") as info:
        _core.read_gguf_metadata(broken)
    assert info.value.kind == "invalid_model"
    text = tmp_path / "notes.gguf"
    text.write_text("just some text, not a model")
    with pytest.raises(_core.OpencampError, match="notes.gguf is not a GGUF file"):
        _core.gguf_tensors(text)


def test_smollm2_metadata_and_tensors_match_the_gguf_package():
    path = _require_shared(SHARED / f"{SMOLLM2}.Q4_1.gguf")
    expected, reader = gguf_reference_metadata(path)
    got = _core.read_gguf_metadata(path)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert as_plain(got[key]) == value, key
    assert got["general.architecture"] == "llama"
    assert len(got["tokenizer.ggml.tokens"]) == 49152
    tensors = _core.gguf_tensors(path)
    assert len(tensors) == 272
    for (name, type_name, shape), t in zip(tensors, reader.tensors):
        assert name == t.name
        assert type_name == t.tensor_type.name
        assert shape == [int(d) for d in reversed(t.shape.tolist())]
