"""Finding a model: a local folder, or a Hugging Face repo id downloaded into the HF cache."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

# What a model folder holds; only config.json is checked up front, the rest when it is loaded.
MODEL_FOLDER_FILES = (
    "config.json, tokenizer.json (with tokenizer_config.json) and the weights as "
    "model.safetensors or model.safetensors.index.json with its model-*-of-*.safetensors shards"
)

# Only what the engine reads. Patterns are matched against the whole path in the repo, so the
# weights patterns skip sub-folders (onnx/, original/, ...) and Mistral's duplicate
# consolidated.safetensors, and no *.bin / *.pth / *.gguf are fetched.
DOWNLOAD_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "additional_chat_templates/*.jinja",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
]

# "org/name" as the Hub spells repo ids: letters, digits, '-', '_', '.', with no '--' or '..',
# neither part starting or ending with '-' or '.'.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")


class ModelNotFoundError(ValueError):
    """A model could not be found locally or fetched from the Hugging Face Hub."""


def looks_like_repo_id(model: str) -> bool:
    """Whether `model` is shaped like a Hugging Face repo id ("org/name")."""
    return bool(_REPO_ID.fullmatch(model)) and "--" not in model and ".." not in model


def _local_alternative(repo_id: str) -> str:
    return (
        "To use a local copy instead, download it on a machine with access, e.g. "
        f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: `huggingface-cli download "
        f"{repo_id} --local-dir DIR`), and pass --model DIR (opencamp.LLM(DIR) in Python)."
    )


def _check_model_folder(folder: Path, shown_as: str) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{shown_as} is not a model folder: it has no config.json. A model folder needs "
            f"{MODEL_FOLDER_FILES}, as in a Hugging Face checkpoint.")
    return folder


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _explain_download_failure(repo_id: str, revision: str | None, error: Exception) -> str:
    """Say what went wrong in words; huggingface_hub's error classes are matched by name, which
    keeps this working across its versions (they moved between modules)."""
    kinds = {cls.__name__ for cls in type(error).__mro__}
    at_revision = f" at revision {revision!r}" if revision else ""
    if "GatedRepoError" in kinds:
        reason = (f"{repo_id} is a gated repository: accept its license on "
                  f"https://huggingface.co/{repo_id} and log in (`hf auth login` or HF_TOKEN)")
    elif "RepositoryNotFoundError" in kinds:
        reason = (f"the Hub has no repository {repo_id} (or it is private: log in with "
                  "`hf auth login` or set HF_TOKEN)")
    elif "RevisionNotFoundError" in kinds:
        reason = f"{repo_id} has no revision {revision!r}"
    elif "OfflineModeIsEnabled" in kinds or _env_flag("HF_HUB_OFFLINE"):
        reason = (f"HF_HUB_OFFLINE is set and {repo_id}{at_revision} is not in the Hugging Face "
                  "cache")
    elif "LocalEntryNotFoundError" in kinds:
        reason = (f"could not reach the Hugging Face Hub and {repo_id}{at_revision} is not in the "
                  f"local cache ({error})")
    else:
        reason = f"downloading {repo_id}{at_revision} failed: {type(error).__name__}: {error}"
    return f"cannot get model {repo_id!r}: {reason}. {_local_alternative(repo_id)}"


def _download(repo_id: str, revision: str | None, progress: bool) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                           enable_progress_bars)
    except ImportError as error:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder, and downloading it needs huggingface_hub "
            f"(pip install huggingface_hub). {_local_alternative(repo_id)}") from error

    silence = not progress and not are_progress_bars_disabled()
    if silence:
        with warnings.catch_warnings():  # it warns when HF_HUB_DISABLE_PROGRESS_BARS=0 forbids it
            warnings.simplefilter("ignore")
            disable_progress_bars()
    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS),
            # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
            local_files_only=_env_flag("HF_HUB_OFFLINE"))
    except Exception as error:  # network, auth, offline, disk: all mean "no model"
        raise ModelNotFoundError(_explain_download_failure(repo_id, revision, error)) from error
    finally:
        if silence:
            enable_progress_bars()
    return _check_model_folder(Path(snapshot), f"{repo_id} (downloaded to {snapshot})")


def resolve_model(model: str | os.PathLike, *, revision: str | None = None,
                  progress: bool = True) -> Path:
    """The local folder of `model`: an existing folder as is, or a Hub repo id downloaded
    (only the files the engine reads) into the usual Hugging Face cache.

    A local folder wins over a repo id of the same name. Raises ModelNotFoundError with what
    to do instead when neither works.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a folder path or a Hugging Face repo id, not {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _check_model_folder(path.resolve(), str(model))
    if path.exists():
        raise ModelNotFoundError(
            f"{model} is a file, not a model folder. Pass the folder that holds "
            f"{MODEL_FOLDER_FILES} (single-file formats such as GGUF are not loaded).")
    if isinstance(model, str) and looks_like_repo_id(model):
        return _download(model, revision, progress)
    raise ModelNotFoundError(
        f"no such folder: {model}. Pass a model folder (with {MODEL_FOLDER_FILES}) or a Hugging "
        "Face repo id such as HuggingFaceTB/SmolLM2-135M-Instruct.")
