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
    assert json.loads(result.stdout)["model"] == {
        "path": str(folder.resolve()), "format": "safetensors", "architecture": "llama",
        "file_type": "float32"}
    text = CliRunner().invoke(main, ["info", "--model", str(folder)]).stdout
    assert f"model: {folder.resolve()}" in text and "architecture       llama" in text


def test_info_with_a_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["info", "--model", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "no such folder or file" in result.output
