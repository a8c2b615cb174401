"""A model's tokenizer and chat template, loaded from its Hugging Face folder or a GGUF file.

Encoding and decoding use the `tokenizers` library on tokenizer.json (or on the tokenizer a GGUF
file's vocabulary describes, see gguf_tokenizer.py), and chat templates are
rendered the way transformers 5.24 renders them (same jinja2 sandbox, filters, globals and
variables), so that the prompt ids the engine sees are the ids transformers would produce.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import stat
import threading
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import tokenizers

from ._core import OpencampError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# Message keys transformers copies reasoning between; the first is the one templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# Limits on rendering one chat template (untrusted code from the model's files): wall time, and
# the characters of the prompt and of any single value it computes on the way.
CHAT_TEMPLATE_TIME_LIMIT_S = 10.0
CHAT_TEMPLATE_OUTPUT_LIMIT = 16 * 1024 * 1024


class TokenizerError(OpencampError, ValueError):
    """The tokenizer files of a model folder are missing, unreadable or malformed.

    An OpencampError of kind "invalid_model", as the engine's loader errors are (and a
    ValueError, as it always was).
    """

    kind = "invalid_model"


class ChatTemplateError(ValueError):
    """A chat template failed: a syntax error, raise_exception(), a sandbox violation, or one of
    the rendering limits (CHAT_TEMPLATE_TIME_LIMIT_S, CHAT_TEMPLATE_OUTPUT_LIMIT)."""


def _present(path: Path) -> bool:
    """Whether anything is at `path`, a broken or looping symlink included: those are then
    reported by _read_text rather than silently taken for an absent file."""
    return os.path.lexists(path)


def _read_text(path: Path) -> str:
    """A model file's text: a regular file (a FIFO would block), decoded as strict UTF-8.

    Every failure is a TokenizerError naming the file.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise TokenizerError(f"cannot open {path}: {error.strerror}") from error
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise TokenizerError(f"{path} is not a regular file; model files must be regular files")
        try:
            data = handle.read()
        except OSError as error:
            raise TokenizerError(f"cannot read {path}: {error.strerror}") from error
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokenizerError(
            f"{path} is not valid UTF-8 (byte {error.start}: {error.reason}); the file is corrupt "
            "or not a text file") from error


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _load_chat_templates(folder: Path, config: Mapping[str, Any]) -> str | dict[str, str] | None:
    """The model's chat template(s), with transformers' precedence.

    chat_template.jinja and additional_chat_templates/*.jinja replace whatever
    tokenizer_config.json says; a single "default" template is kept as a plain string, several
    templates as a name -> template dict. tokenizer_config.json's chat_template may itself be a
    string or a list of {"name", "template"}.
    """
    from_files: dict[str, str] = {}
    template_file = folder / CHAT_TEMPLATE_FILE
    if _present(template_file):
        from_files["default"] = _read_text(template_file)
    extra_dir = folder / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for extra in sorted(extra_dir.glob("*.jinja")):
            from_files[extra.name.removesuffix(".jinja")] = _read_text(extra)
    if from_files:
        return from_files["default"] if list(from_files) == ["default"] else from_files

    configured = config.get("chat_template")
    if isinstance(configured, str):
        return configured
    if isinstance(configured, (list, tuple)):
        try:
            return {entry["name"]: entry["template"] for entry in configured}
        except (KeyError, TypeError) as error:
            raise TokenizerError(
                f"{folder / TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list of "
                '{"name": ..., "template": ...} entries') from error
    return None


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the conversation and copy it into what transformers hands the template.

    Like transformers, keys whose value is None are dropped (templates test for missing keys,
    not None) and reasoning given as "thinking"/"reasoning" is also offered as
    "reasoning_content" (and vice versa).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            "messages must be a list of {'role': str, 'content': str} dicts, "
            f"not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    prepared = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"messages[{index}] must be a dict with 'role' and 'content', "
                f"not {type(message).__name__}")
        message = {key: value for key, value in message.items() if value is not None}
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}] needs a string 'role' (e.g. 'user')")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}] needs a string 'content'")
        reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        numbers.append(int(digits or 0))
    return tuple(numbers)


def _too_large(what: str, size: int) -> ChatTemplateError:
    return ChatTemplateError(
        f"chat template exceeded the output limit: {what} would make {size} characters or "
        f"items (limit {CHAT_TEMPLATE_OUTPUT_LIMIT}, CHAT_TEMPLATE_OUTPUT_LIMIT)")


_SIZED = (str, bytes, list, tuple)
# printf-style (%10.5d, %*d) and str.format ({:>10}, {:.{n}}) widths and precisions.
_PRINTF_SIZES = re.compile(r"%[#0\- +]*(\d*|\*)(?:\.(\d*|\*))?")
_FORMAT_SPECS = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format_string(template: Any) -> None:
    """Refuse a format string whose widths alone would exceed the output limit ('%999999999d')."""
    if not isinstance(template, str):
        return
    numbers = [n for match in _PRINTF_SIZES.finditer(template) for n in match.groups() if n and n != "*"]
    numbers += re.findall(r"\d+", " ".join(_FORMAT_SPECS.findall(template)))
    for number in numbers:
        if len(number) > 9 or int(number) > CHAT_TEMPLATE_OUTPUT_LIMIT:
            raise _too_large(f"the format width {number}", int(number[:18]))


def _check_arguments(what: str, args: Iterable[Any]) -> None:
    """Refuse integer arguments (widths, counts, repetitions) beyond the output limit."""
    for value in args:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > CHAT_TEMPLATE_OUTPUT_LIMIT:
            shown = value if value.bit_length() <= 64 else f"of {value.bit_length()} bits"
            raise _too_large(f"{what} with argument {shown}", min(abs(value), 2**64))
        if isinstance(value, tuple):
            _check_arguments(what, value)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Sizes of `left <operator> right` for the operators that can allocate without bound."""
    if operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, _SIZED) and isinstance(count, int):
                if len(sequence) * max(count, 0) > CHAT_TEMPLATE_OUTPUT_LIMIT:
                    raise _too_large(f"a {type(sequence).__name__} of {len(sequence)} times {count}",
                                     len(sequence) * count)
    elif operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            if len(left) + len(right) > CHAT_TEMPLATE_OUTPUT_LIMIT:
                raise _too_large("joining two values", len(left) + len(right))
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            # An integer of more digits than the output limit could hold is never printable.
            digits = int(abs(left).bit_length() * right * 0.30103)  # log10(2)
            if digits > CHAT_TEMPLATE_OUTPUT_LIMIT:
                raise _too_large(f"{left} ** {right} (in digits)", digits)
    elif operator == "%" and isinstance(left, str):
        _check_format_string(left)
        _refuse_over("'%' formatting", _inserted_size(left, right))
        if any(match.group(1) == "*" or match.group(2) == "*" for match in _PRINTF_SIZES.finditer(left)):
            # Widths given as arguments ('%*d' % (n, x)): the integers among them are checked.
            _check_arguments("'%' formatting", right if isinstance(right, tuple) else (right,))


def _refuse_over(what: str, size: int | None) -> None:
    if size is not None and size > CHAT_TEMPLATE_OUTPUT_LIMIT:
        raise _too_large(what, size)


def _inserted_size(template: str, values: Any) -> int:
    """A lower bound on the length of a format string filled with `values` (a value, a tuple, a
    list or a mapping): its own text plus the strings it inserts, so that '%s%s' % (s, s) in a
    loop cannot double a string past the limit."""
    if isinstance(values, Mapping):
        values = list(values.values())
    elif not isinstance(values, (tuple, list)):
        values = [values]
    return len(template) + sum(len(value) for value in values if isinstance(value, str))


def _check_result(what: str, result: Any) -> Any:
    """The result of a filter or string method, refused when it is over the limit anyway (one
    step past it at most: each input was within it)."""
    if isinstance(result, _SIZED):
        _refuse_over(what, len(result))
    return result


def _join_size(separator: Any, items: Any) -> int | None:
    """The length of separator.join(items) without building it (None if not a sized join)."""
    if not isinstance(items, (list, tuple)):
        return None
    return len(str(separator)) * max(len(items) - 1, 0) + sum(
        len(item) if isinstance(item, str) else len(str(item)) for item in items)


# Filters whose integer arguments size their result (center(10**9), indent(width=10**9), ...).
_SIZING_FILTERS = frozenset(["center", "indent", "wordwrap", "truncate", "batch", "slice", "tojson"])
# str methods likewise ('a'.ljust(10**9)).
_SIZING_STR_METHODS = frozenset(["center", "ljust", "rjust", "zfill", "expandtabs"])


def _checked_filter(name: str, function):
    """A filter that refuses oversized integer arguments (center(10**9)) and results (join,
    replace, format) before it builds them."""
    import functools

    from jinja2.environment import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    @functools.wraps(function)  # keeps jinja2's pass_environment / pass_context marks
    def checked(*args, **kwargs):
        values = [a for a in args if not isinstance(a, (Environment, Context, EvalContext))]
        if name in _SIZING_FILTERS:
            _check_arguments(f"the {name} filter", list(values[1:]) + list(kwargs.values()))
        if name == "join" and values:
            size = _join_size(values[1] if len(values) > 1 else kwargs.get("d", ""),
                              list(values[0]) if isinstance(values[0], (list, tuple)) else None)
            if size is not None and size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                raise _too_large("the join filter", size)
        if name == "format" and values:
            _check_format_string(values[0])
            if isinstance(values[0], str):
                _refuse_over("the format filter", _inserted_size(values[0], list(values[1:]) + list(kwargs.values())))
        if name == "indent" and values and isinstance(values[0], str):
            width = values[1] if len(values) > 1 else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            _refuse_over("the indent filter", len(values[0]) + width * (values[0].count("\n") + 1))
        if name == "replace" and len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
            text, old, new = values[:3]
            size = len(text) + (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0)
            if size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                raise _too_large("the replace filter", size)
        return _check_result(f"the {name} filter", function(*args, **kwargs))

    return checked


class _TemplateTimeout(BaseException):
    """Raised inside the rendering thread when the time limit passes (BaseException: no
    `except Exception` on the way may swallow it)."""


class _RenderDeadline:
    """Interrupts the current thread's rendering after `seconds` with _TemplateTimeout.

    A timer thread raises the exception asynchronously in the rendering thread (Python code
    only: every loop a template runs is). The lock makes firing and finishing exclusive: once
    __exit__ has marked the render done no exception is sent, and one sent but not yet
    delivered is withdrawn, so it can never surface in the caller's code after the render.
    """

    def __init__(self, seconds: float):
        self._seconds = seconds
        self._lock = threading.Lock()
        self._done = False
        self._fired = False
        self._thread_id = threading.get_ident()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread_id), ctypes.py_object(_TemplateTimeout))
                self._fired = True

    def __enter__(self) -> "_RenderDeadline":
        self._timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        with self._lock:
            self._done = True
            if self._fired:  # withdraw it in case it has not been delivered yet
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread_id), None)
        self._timer.cancel()


@lru_cache(maxsize=1)
def _limited_environment_class():
    """transformers' sandbox plus the size checks on operators, calls and concatenation."""
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedCodeGenerator(CodeGenerator):
        # `a ~ b` compiles to a module-level join no environment hook sees: route it through one.
        def visit_Concat(self, node, frame):
            self.write("environment.limited_concat((")
            for argument in node.nodes:
                self.visit(argument, frame)
                self.write(", ")
            self.write("))")

    class LimitedSandboxedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = LimitedCodeGenerator
        intercepted_binops = frozenset(["*", "**", "%", "+"])

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped
            owner = getattr(method, "__self__", None)
            name = getattr(method, "__name__", "")
            if isinstance(owner, str):
                if name in _SIZING_STR_METHODS:
                    _check_arguments(f"str.{name}()", list(args) + list(kwargs.values()))
                elif name in ("format", "format_map"):
                    _check_format_string(owner)
                    _refuse_over(f"str.{name}()", _inserted_size(owner, list(args) + list(kwargs.values())))
                elif name == "join" and args:
                    size = _join_size(owner, list(args[0]) if isinstance(args[0], (list, tuple)) else None)
                    if size is not None and size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                        raise _too_large("str.join()", size)
                elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                    old, new = args[:2]
                    size = len(owner) + (owner.count(old) if old else len(owner) + 1) * max(len(new) - len(old), 0)
                    if size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                        raise _too_large("str.replace()", size)
                return _check_result(f"str.{name}()", super().call(__context, __obj, *args, **kwargs))
            return super().call(__context, __obj, *args, **kwargs)

        def limited_concat(self, values):
            parts = [value if isinstance(value, str) else str(value) for value in values]
            size = sum(map(len, parts))
            if size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                raise _too_large("the ~ operator", size)
            return "".join(parts)

    return LimitedSandboxedEnvironment


def _render_limited(compiled, variables: Mapping[str, Any]) -> str:
    """Render with the time and output limits: chunk by chunk, counting characters."""
    parts = []
    size = 0
    try:
        with _RenderDeadline(CHAT_TEMPLATE_TIME_LIMIT_S):
            for chunk in compiled.generate(**variables):
                size += len(chunk)
                if size > CHAT_TEMPLATE_OUTPUT_LIMIT:
                    raise _too_large("the rendered prompt", size)
                parts.append(chunk)
    except _TemplateTimeout:
        raise ChatTemplateError(
            f"chat template took longer than {CHAT_TEMPLATE_TIME_LIMIT_S:g} s to render "
            "(CHAT_TEMPLATE_TIME_LIMIT_S); it loops too long for this conversation") from None
    return "".join(parts)


@lru_cache(maxsize=32)
def _compile_template(source: str):
    """Compile a chat template in the sandbox transformers uses (cached: templates are reused)."""
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.utils

    if _version_tuple(jinja2.__version__) < (3, 1, 6):
        # Chat templates come from the Hub and are untrusted code; older jinja2 releases have
        # known sandbox escapes, so transformers refuses them too.
        raise ChatTemplateError(
            f"rendering chat templates needs jinja2>=3.1.6 (found {jinja2.__version__}): "
            "pip install -U jinja2")

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja2's own tojson escapes HTML characters (<, >, &, '), which would change prompts.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:
        """`dict` for templates: only construction, so attribute tricks cannot reach dict internals."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """`namespace` for templates that refuses underscore names, as transformers' does."""

        def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2's Namespace
            self, args = args[0], args[1:]
            attributes = dict(*args, **kwargs)
            for name in attributes:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attributes)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                    f"but got {name!r}")

    environment = _limited_environment_class()(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    for name, function in list(environment.filters.items()):
        environment.filters[name] = _checked_filter(name, function)
    environment.filters["tojson"] = _checked_filter("tojson", tojson)  # its indent sizes the result
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    return environment.from_string(source)


def _decoder_type(backend: tokenizers.Tokenizer) -> str | None:
    decoder = backend.decoder
    return None if decoder is None else type(decoder).__name__


_BYTE_LEVEL: dict[str, int] = {}


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as -> the byte."""
    if not _BYTE_LEVEL:
        printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                     + list(range(ord("\xae"), ord("\xff") + 1)))
        shifted = 0
        for byte in range(256):
            if byte in printable:
                _BYTE_LEVEL[chr(byte)] = byte
            else:
                _BYTE_LEVEL[chr(256 + shifted)] = byte
                shifted += 1
    return _BYTE_LEVEL


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: Mapping[str, str] | None = None,
                 chat_template: str | Mapping[str, str] | None = None, name: str = "tokenizer"):
        self._backend = backend
        self._special_tokens = dict(special_tokens or {})
        self._chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self._name = name
        self._special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json and any chat_template.jinja from a model folder."""
        folder = Path(path)
        tokenizer_file = folder / TOKENIZER_FILE
        if not _present(tokenizer_file):
            raise TokenizerError(
                f"{folder} has no {TOKENIZER_FILE}: opencamp needs the Hugging Face fast-tokenizer "
                f"file. Copy {TOKENIZER_FILE} (and {TOKENIZER_CONFIG_FILE}) from the model's Hub "
                "repository into that folder, or save it with transformers' "
                "AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
        text = _read_text(tokenizer_file)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot load {tokenizer_file}: {error}") from error

        config_file = folder / TOKENIZER_CONFIG_FILE
        config = _read_json(config_file) if _present(config_file) else {}
        special_tokens = cls._special_tokens_from(config)
        legacy_map_file = folder / SPECIAL_TOKENS_MAP_FILE
        if _present(legacy_map_file):
            # Older checkpoints keep special tokens here; tokenizer_config.json wins where both say.
            for key, value in cls._special_tokens_from(_read_json(legacy_map_file)).items():
                special_tokens.setdefault(key, value)
        return cls(backend, special_tokens=special_tokens,
                   chat_template=_load_chat_templates(folder, config), name=str(folder))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike,
                  metadata: Mapping[str, Any] | None = None) -> "Tokenizer":
        """The tokenizer of a GGUF model file.

        A tokenizer.json next to the file wins (the model's own tokenizer, as a folder has it);
        otherwise it is built from the vocabulary in the file's metadata (opencamp.gguf_tokenizer).
        Either way the chat template falls back to the file's tokenizer.chat_template.
        `metadata`: the file's metadata when the caller has read it already.
        """
        from .gguf_file import read_metadata
        from .gguf_tokenizer import chat_templates, check_same_vocabulary

        path = Path(path)
        if metadata is None:
            metadata = read_metadata(path)
        if (path.parent / TOKENIZER_FILE).is_file():
            tokenizer = cls.from_model_dir(path.parent)
            check_same_vocabulary(tokenizer.backend, metadata,
                                  f"{path.parent / TOKENIZER_FILE}", str(path))
            if not tokenizer.has_chat_template:
                tokenizer._chat_template = chat_templates(metadata)
            return tokenizer
        return cls.from_gguf_metadata(metadata, str(path))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], name: str = "the GGUF file") -> "Tokenizer":
        """The tokenizer a GGUF file's metadata describes (`name`, the file, appears in errors)."""
        from .gguf_tokenizer import build

        built = build(metadata, name)
        return cls(built.backend, special_tokens=built.special_tokens,
                   chat_template=built.chat_template, name=name)

    @staticmethod
    def _special_tokens_from(config: Mapping[str, Any]) -> dict[str, str]:
        """The named special tokens plus model-specific "*_token" entries (e.g. image_token).

        These are the strings transformers offers to chat templates as variables.
        """
        entries = dict(config)
        if isinstance(config.get("extra_special_tokens"), Mapping):  # transformers 5's named extras
            entries.update(config["extra_special_tokens"])
        found = {}
        for key, value in entries.items():
            content = _token_content(value) if key.endswith("_token") else None
            if content is not None:
                found[key] = content
        return found

    # ---- plain tokenization ---------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens applies tokenizer.json's post-processor (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Incomplete UTF-8 at the edges comes out as U+FFFD."""
        return self._backend.decode([int(token_id) for token_id in ids],
                                    skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for (a byte-level BPE token may hold part of a UTF-8
        character, which decode() would show as U+FFFD): what OpenAI's logprobs `bytes` hold."""
        cache = self.__dict__.setdefault("_token_bytes", {})
        found = cache.get(token_id)
        if found is None:
            found = cache[token_id] = self._bytes_of(int(token_id))
        return found

    def _bytes_of(self, token_id: int) -> bytes:
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        added = self._backend.get_added_tokens_decoder().get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        byte_fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte_fallback:  # SentencePiece's byte tokens
            return bytes([int(byte_fallback.group(1), 16)])
        if _decoder_type(self._backend) == "ByteLevel":
            table = _byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (transformers' len(tokenizer))."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special-token variables a chat template sees (bos_token, eos_token, ...)."""
        return dict(self._special_tokens)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what skip_special_tokens removes)."""
        return self._special_token_ids

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    # ---- chat templates -------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template)

    @property
    def chat_template(self) -> str | None:
        """The template apply_chat_template uses when no tools are given (None if there is none)."""
        if isinstance(self._chat_template, dict):
            return self._chat_template.get("default")
        return self._chat_template

    def _select_template(self, tools: Any) -> str:
        """Pick the template as transformers' get_chat_template does."""
        template = self._chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ChatTemplateError(
                f"{self._name} has several chat templates ({', '.join(sorted(template))}) and none "
                "is named 'default'")
        if not template:
            raise ChatTemplateError(
                f"{self._name} has no chat template (no {CHAT_TEMPLATE_FILE} and no chat_template "
                f"in {TOKENIZER_CONFIG_FILE}); it is probably a base model, not a chat model. "
                "Pass a raw prompt instead of messages, or add a chat_template.jinja to the folder")
        return template

    def apply_chat_template(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` to the prompt text exactly as transformers' apply_chat_template(tokenize=False).

        The template sees messages, add_generation_prompt, tools, documents, the special tokens
        (bos_token, eos_token, ...) and `extra` (which overrides the special tokens, as in
        transformers). Unlike transformers, add_generation_prompt defaults to True: an engine
        renders chats to generate the assistant's reply.
        """
        prepared = _validate_messages(messages)
        tools = extra.pop("tools", None)
        documents = extra.pop("documents", None)
        source = self._select_template(tools)
        variables = {**self._special_tokens, **extra}
        import jinja2.exceptions

        try:
            compiled = _compile_template(source)
            return _render_limited(compiled, dict(messages=prepared, tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt, **variables))
        except ChatTemplateError:
            raise
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ChatTemplateError(
                f"the chat template of {self._name} has a syntax error (line {error.lineno}): "
                f"{error.message}") from error
        except jinja2.exceptions.TemplateError as error:
            # raise_exception(...) messages, undefined variables and sandbox SecurityErrors.
            raise ChatTemplateError(f"chat template error: {error}") from error
        except Exception as error:  # a template can fail like any code: 'a' + 1, a missing key, ...
            raise ChatTemplateError(
                f"chat template failed: {type(error).__name__}: {error}") from error

    def encode_chat(self, messages: list[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        """Prompt ids of a conversation.

        The rendered text is encoded without the post-processor's special tokens, as
        transformers' apply_chat_template(tokenize=True) does: templates write BOS themselves.
        """
        rendered = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(rendered, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self._name!r}, vocab_size={self.vocab_size})"
