"""The `opencamp` command: generate and chat on the real SmolLM2, and its errors."""
import re
import shutil
import subprocess
import sys

from click.testing import CliRunner

from opencamp.cli import main
from conftest import SMOLLM2_QUESTION


def test_generate_with_chat_template_answers(smollm2_dir):
    result = CliRunner().invoke(main, ["generate", "--model", str(smollm2_dir), "--threads", "2",
                                       "--chat", SMOLLM2_QUESTION])
    assert result.exit_code == 0, result.output
    assert "The capital of France is Paris." in result.stdout
    assert "tokens, stop" in result.stderr  # statistics go to stderr


def test_generate_raw_prompt_respects_max_tokens(smollm2_dir):
    result = CliRunner().invoke(main, ["generate", "-m", str(smollm2_dir), "--threads", "2",
                                       "--max-tokens", "3", "Once upon a time"])
    assert result.exit_code == 0, result.output
    assert "[3 tokens, length" in result.stderr


def run_chat(smollm2_dir, *lines):
    """`opencamp chat` on SmolLM2 fed `lines`; the result and its statistics lines (stderr)."""
    result = CliRunner().invoke(main, ["chat", "--model", str(smollm2_dir), "--threads", "2",
                                       "--max-tokens", "24"], input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    return result, [line for line in result.stderr.splitlines() if line.startswith("[")]


def test_chat_is_multi_turn_and_reuses_the_cache(smollm2_dir):
    result, stats = run_chat(smollm2_dir, SMOLLM2_QUESTION, "And of Germany?", "/exit")
    assert "The capital of France is Paris." in result.stdout
    assert len(stats) == 2
    assert "(0 cached)" in stats[0]
    assert "(0 cached)" not in stats[1]  # the second turn reused the first turn's tokens


def test_chat_reset_starts_a_new_conversation(smollm2_dir):
    result, stats = run_chat(smollm2_dir, SMOLLM2_QUESTION, "/reset", SMOLLM2_QUESTION, "/exit")
    assert "(new conversation)" in result.stderr
    assert result.stdout.count("The capital of France is Paris.") == 2
    assert len(stats) == 2
    # After /reset the question is a first turn again: the 37-token prompt of the reference,
    # not the first turn's history plus the question (as without /reset).
    assert [re.search(r"prompt (\d+) ", line).group(1) for line in stats] == ["37", "37"]


def test_missing_model_is_a_clean_error(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 1
    assert "Error:" in result.stderr and "nope" in result.stderr
    assert "Traceback" not in result.output


def test_bad_option_value_is_a_clean_error(smollm2_dir):
    result = CliRunner().invoke(main, ["generate", "--model", str(smollm2_dir), "--top-p", "0",
                                       "hi"])
    assert result.exit_code == 1
    assert "top_p" in result.stderr


def test_installed_console_script_runs():
    executable = shutil.which("opencamp") or str(__import__("pathlib").Path(sys.executable).parent / "opencamp")
    completed = subprocess.run([executable, "--version"], capture_output=True, text=True, check=True)
    assert completed.stdout.startswith("opencamp, version ")
    listed = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in listed and "chat" in listed
