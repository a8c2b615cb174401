"""GGUF files on the Python side: recognising one, and reading its metadata."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every metadata key of a GGUF file -> its value (str, int, float, bool, a list of str, or a
    numpy array for numeric arrays), read by the C++ reader with its checks and errors."""
    from . import _core

    return _core.read_gguf_metadata(str(path))


def tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many tensors of a GGUF file have each ggml type: {"Q4_1": 210, "F32": 61, ...}."""
    from . import _core

    return dict(Counter(ggml_type for _, ggml_type, _ in _core.gguf_tensors(str(path))))


# llama.cpp's general.file_type values (llama_ftype): the type most of a file's tensors have.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
}


def describe_gguf(metadata: dict[str, Any]) -> dict[str, Any]:
    """The model a GGUF file says it holds: name, architecture and file type (when stated)."""
    described = {}
    for key, field in (("general.name", "name"), ("general.architecture", "gguf_architecture")):
        if isinstance(metadata.get(key), str):
            described[field] = metadata[key]
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        described["file_type"] = FILE_TYPES.get(file_type, f"unknown ({file_type})")
    return described
