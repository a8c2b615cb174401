"""What opencamp says it loaded: LLM.model_info, `opencamp info --model`, and the load lines of
the commands (file, format, architecture, types)."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from conftest import FIXTURES

import opencamp
from opencamp.cli import main


def test_model_info_of_a_safetensors_folder() -> None:
    folder = FIXTURES / "tiny-qwen2"
    llm = opencamp.LLM(folder, backend="cpu", threads=1)
    assert llm.model_path == folder.resolve()
    assert llm.model_info == {"path": str(folder.resolve()), "format": "safetensors",
                              "architecture": "qwen2", "file_type": "float32", "dtype": llm.dtype}


def test_info_describes_a_model_without_loading_it() -> None:
    folder = FIXTURES / "tiny-llama"
    result = CliRunner().invoke(main, ["info", "--json", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    # 2 layers x 2 KV heads x head_dim 8, keys and values: 256 bytes a position in f32; q8_0
    # needs head_dim a multiple of 32.
    assert json.loads(result.stdout)["model"] == {
        "path": str(folder.resolve()), "format": "safetensors", "architecture": "llama",
        "file_type": "float32",
        "kv_bytes_per_position": {"f32": 256, "bf16": 128, "f16": 128, "q8_0": None}}
    text = CliRunner().invoke(main, ["info", "--model", str(folder), "--kv-cache-dtype", "bf16"]).stdout
    assert f"model: {folder.resolve()}" in text and "architecture       llama" in text
    assert "    bf16  128 bytes <-" in text and "    f32   256 bytes\n" in text


def test_info_gives_gemma3s_global_bytes_per_position_and_the_bounded_sliding_part() -> None:
    folder = FIXTURES / "tiny-gemma3"  # 1 global layer, 5 with a window of 5; 1 KV head of 16
    result = CliRunner().invoke(main, ["info", "--json", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["kv_bytes_per_position"] == {"f32": 128, "bf16": 64, "f16": 64, "q8_0": None}
    # A sequence keeps at most 4 blocks of 16 in a sliding layer: the window, aligned down to
    # the 16-key chunks attention reads, and the block either end shares.
    assert model["kv_sliding_window_layers"] == {
        "global_layers": 1, "layers": 5, "window": 5, "positions_per_sequence": 64,
        "bytes_per_position": {"f32": 640, "bf16": 320, "f16": 320, "q8_0": None}}
    text = CliRunner().invoke(main, ["info", "--model", str(folder), "--kv-cache-dtype", "f16"]).stdout
    assert ("    f16   64 bytes (1 global layers) + 320 bytes (5 sliding-window layers, window 5: at "
            "most 64 positions per sequence) <-") in text


def test_info_with_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["info", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "no such folder or file" in result.output


def test_info_describes_a_gguf_file(smollm2_gguf: Path) -> None:
    result = CliRunner().invoke(main, ["info", "--json", "--model", str(smollm2_gguf)])
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model == {
        "path": str(smollm2_gguf), "format": "gguf", "architecture": "llama",
        "name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "file_type": "Q4_1",
        # token_embd Q8_0, the layer matrices Q4_1, the norms F32 (../shared/models/README.md).
        "tensor_types": {"Q8_0": 1, "Q4_1": 210, "F32": 61},
        # 30 layers x 3 KV heads x 64 dims, keys and values; q8_0: 34 bytes per 32 values.
        "kv_bytes_per_position": {"f32": 46080, "bf16": 23040, "f16": 23040, "q8_0": 12240}}


def test_file_type_names_agree_with_the_gguf_package() -> None:
    import gguf

    from opencamp.gguf_file import FILE_TYPES

    for file_type in gguf.LlamaFileType:
        if file_type.value in FILE_TYPES:
            assert file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_") == \
                FILE_TYPES[file_type.value]
    assert {3, 7, 15, 17, 18, 32} <= set(FILE_TYPES)
