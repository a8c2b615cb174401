"""The `opencamp` command: generate and chat in the terminal (serve comes with the server)."""
from __future__ import annotations

import sys
import time

import click

from . import __version__


def _sampling_options(f):
    """The sampling flags shared by every generating command."""
    options = [
        click.option("--max-tokens", default=256, show_default=True, help="Tokens to generate at most."),
        click.option("--temperature", default=0.0, show_default=True, help="0 means greedy."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens (0: off)."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling threshold (1: off)."),
        click.option("--min-p", default=0.0, show_default=True, help="Drop tokens below min-p x the top probability."),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 is off."),
        click.option("--seed", type=int, default=None, help="Same seed, same output."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(f):
    options = [
        click.option("--model", "-m", required=True, help="Local Hugging Face model folder or a Hub repo id."),
        click.option("--backend", default="auto", show_default=True, help="auto, cpu, ..."),
        click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "f32", "bf16"])),
        click.option("--threads", type=int, default=None, help="Default: physical cores."),
        click.option("--max-context", type=int, default=None, help="Positions per conversation (default: the model's)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(model, backend, dtype, threads, max_context):
    from . import LLM, ModelNotFoundError, OpencampError

    click.echo(f"loading {model} ...", err=True)
    start = time.perf_counter()
    try:
        llm = LLM(model, backend=backend, dtype=dtype, threads=threads, max_context=max_context)
    except (ModelNotFoundError, OpencampError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"loaded {llm.config['model_type']} ({llm.dtype}, backend {llm.backend}, "
               f"{llm.threads} threads) in {time.perf_counter() - start:.1f} s", err=True)
    return llm


def _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop):
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=list(stop))


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
def generate(model, backend, dtype, threads, max_context, as_chat, prompt, **sampling) -> None:
    """Continue PROMPT and stream the text to stdout (statistics go to stderr)."""
    from . import OpencampError

    llm = _load(model, backend, dtype, threads, max_context)
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
def chat(model, backend, dtype, threads, max_context, system, **sampling) -> None:
    """Multi-turn chat in the terminal. /reset starts over, /exit (or Ctrl-D) quits."""
    from . import OpencampError

    llm = _load(model, backend, dtype, threads, max_context)
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


if __name__ == "__main__":
    main()
