"""The chat page in a real browser: Debian's chromium driven by Playwright, against a live
`opencamp serve` running the real SmolLM2-135M-Instruct.

Needs the `chromium` Debian package (tests/run_all.sh's CI installs it; Playwright's own browser
download is never used). A screenshot of the page is kept in build/test-artifacts/ (or
$OPENCAMP_TEST_ARTIFACTS).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import REPO, SMOLLM2_QUESTION
from serverkit import ServeProcess, count, wait_until

CHROMIUM = os.environ.get("OPENCAMP_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("OPENCAMP_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium browser: apt-get install chromium (or set "
                             "OPENCAMP_CHROMIUM to a Chromium executable)")

TIMEOUT_MS = 300_000  # generous: the reference backend on 2 cores is slow, not stuck


@pytest.fixture(scope="module")
def server(smollm2_dir):
    process = ServeProcess(["--model", str(smollm2_dir), "--threads", "2", "--max-context", "1024",
                            "--temperature", "0.3", "--max-tokens", "48"])
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.console_errors = []
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    page.sent = []  # bodies of the chat requests the page made
    page.on("request", lambda r: page.sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.post_data else None)
    page.goto(server + "/")
    yield page
    assert page.console_errors == [], page.console_errors  # no script error all along
    context.close()


def last_reply(page):
    return page.locator(".message.assistant").last


def send(page, text, done="finished"):
    """Type a message and press Enter; wait until the reply is done. Returns how many times
    the reply's text changed while it streamed (counted from before the message is sent: a
    cached prompt can answer in a few milliseconds)."""
    before = page.locator(".message.assistant").count()
    page.evaluate("""() => {
        window.__updates = 0;
        if (window.__observer) window.__observer.disconnect();
        window.__observer = new MutationObserver((records) => {
            for (const r of records) {
                const node = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
                if (node && node.closest('.message.assistant .content')) window.__updates += 1;
            }
        });
        window.__observer.observe(document.getElementById('messages'),
                                  {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant').length > {before}")
    if done is not None:
        wait_done(page, done)
    return page.evaluate("window.__updates")


def wait_done(page, done):
    page.wait_for_function("[...document.querySelectorAll('.message.assistant')].pop()"
                           f".dataset.done === '{done}'")


def test_page_loads_with_the_server_defaults(page):
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.text_content("#model-name") == "SmolLM2-135M-Instruct"
    # The controls start from the server's defaults (serve --temperature 0.3 --max-tokens 48).
    assert page.input_value("#temperature") == "0.3"
    assert page.input_value("#max-tokens") == "48"
    assert page.input_value("#top-p") == "1"
    assert "context 1024 tokens" in page.text_content("#server-info")
    assert page.is_hidden("#defaults-note")  # the command set them: no chat-page defaults


def test_the_page_starts_chat_friendly_when_nothing_sets_defaults(browser, server):
    """What /config says for a server whose model and command set no sampling defaults
    (test_server_api.py checks the server's side): the page takes page_defaults and says so."""
    config = httpx.get(server + "/config").json()
    chat_friendly = {**config["defaults"], "temperature": 0.8, "top_k": 40, "top_p": 0.95,
                     "min_p": 0.05}
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route("**/config", lambda route: route.fulfill(json={
            **config, "page_defaults": chat_friendly, "page_defaults_source": "chat"}))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('temperature').value === '0.8'")
        assert [page.input_value(f"#{c}") for c in ("top-k", "top-p", "min-p")] == \
            ["40", "0.95", "0.05"]
        assert "the model sets none" in page.text_content("#defaults-note")
        assert page.is_visible("#defaults-note")
    finally:
        context.close()


def test_markdown_is_rendered_safely(page):
    html = page.evaluate("renderMarkdown('# Title\\n\\nSome **bold** and `code`.\\n\\n"
                         "```python\\nprint(1 < 2)\\n```\\n- one\\n- two\\n\\n"
                         "<script>alert(1)</script> [x](javascript:alert(1))')")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html
    assert "<code>code</code>" in html
    assert '<pre data-lang="python"><code>print(1 &lt; 2)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "href" not in html  # only http(s) links become links
    # Numbered items separated by blank lines stay one list, numbered on.
    loose = page.evaluate("renderMarkdown('1. **a** x\\n\\n2. b\\n\\n3. c')")
    assert loose == "<ol><li><strong>a</strong> x</li><li>b</li><li>c</li></ol>"
    assert page.evaluate("renderMarkdown('3. c')") == '<ol start="3"><li>c</li></ol>'
    # A fence still open while a reply streams already shows as code.
    assert "<pre><code>partial" in page.evaluate("renderMarkdown('```\\npartial')")


def test_a_question_gets_a_streamed_answer(page):
    page.fill("#temperature", "0")
    updates = send(page, SMOLLM2_QUESTION)
    reply = last_reply(page)
    assert "The capital of France is Paris." in reply.locator(".content").inner_text()
    assert updates >= 3  # the text arrived piece by piece, not at once
    stats = reply.locator(".stats").inner_text()
    assert re.search(r"first token [\d.]+ s", stats) and "tok/s" in stats
    assert "8 tokens" in stats and "prompt 37" in stats
    request = page.sent[-1]
    assert request["stream"] is True and request["temperature"] == 0
    assert request["max_tokens"] == 48
    assert request["messages"] == [{"role": "user", "content": SMOLLM2_QUESTION}]


def test_changed_settings_apply_to_the_second_turn(page):
    page.fill("#temperature", "0.5")
    page.fill("#max-tokens", "6")
    page.fill("#seed", "7")
    send(page, "And of Germany?")
    request = page.sent[-1]
    assert request["temperature"] == 0.5 and request["max_tokens"] == 6 and request["seed"] == 7
    assert [m["role"] for m in request["messages"]] == ["user", "assistant", "user"]
    assert request["messages"][1]["content"] == "The capital of France is Paris."
    stats = last_reply(page).locator(".stats").inner_text()
    tokens = int(re.search(r"(\d+) tokens", stats).group(1))
    assert 1 <= tokens <= 6
    prompt, cached = map(int, re.search(r"prompt (\d+) \((\d+) cached\)", stats).groups())
    assert cached >= 37 and cached < prompt  # the first turn came from the KV cache
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_stop_button_stops_a_long_generation(page, server):
    def cancelled():
        return count(httpx.get(server + "/metrics").text, "opencamp_requests_total",
                     endpoint="chat", finish_reason="cancelled")

    before = cancelled()
    page.fill("#max-tokens", "900")
    page.fill("#temperature", "0.8")
    send(page, "Write a very long story about a dragon who learns to cook.", done=None)
    assert page.is_visible("#stop") and not page.is_visible("#send")
    page.wait_for_function("window.__updates >= 3")  # it is streaming
    page.click("#stop")
    reply = last_reply(page)
    wait_done(page, "stopped")
    assert "stopped" in reply.locator(".stats").inner_text()
    assert page.is_visible("#send") and not page.is_visible("#stop")
    assert reply.locator(".content").inner_text().strip()  # the partial story stays
    wait_until(lambda: cancelled() == before + 1, timeout=60, what="the server to cancel")


def test_new_chat_and_system_prompt(page):
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.fill("#system-prompt", "You are a pirate.")
    page.fill("#max-tokens", "4")
    send(page, "Hello!")
    assert page.sent[-1]["messages"] == [{"role": "system", "content": "You are a pirate."},
                                         {"role": "user", "content": "Hello!"}]


def test_errors_are_shown(page):
    page.fill("#temperature", "5")  # beyond what the server accepts
    send(page, "Hi again", done="error")
    banner = page.locator("#error")
    assert banner.is_visible()
    assert "HTTP 400" in banner.inner_text() and "temperature must be between 0 and 2" in \
        banner.inner_text()
    page.fill("#temperature", "0")
    page.route("**/v1/chat/completions", lambda route: route.abort())
    try:
        send(page, "Anyone there?", done="error")
        assert "Cannot reach the server" in banner.inner_text()
    finally:
        page.unroute("**/v1/chat/completions")
    send(page, "Back again?")  # and the page recovers
    assert not banner.is_visible()
