// The opencamp chat page: talks to this server's OpenAI-compatible API with streaming (SSE over
// fetch), keeps the conversation in the page, and sends the sampling settings with every message.
"use strict";

const $ = (id) => document.getElementById(id);

const CONTROLS = [
  // [input id, request field, parse]
  ["temperature", "temperature", parseFloat],
  ["top-k", "top_k", (v) => parseInt(v, 10)],
  ["top-p", "top_p", parseFloat],
  ["min-p", "min_p", parseFloat],
  ["repetition-penalty", "repetition_penalty", parseFloat],
  ["max-tokens", "max_tokens", (v) => parseInt(v, 10)],
];
const PAGE_MAX_TOKENS = 512; // when the server sets no default, replies may use the whole context

const state = {
  config: null,
  history: [], // [{role, content}] of the conversation so far (without the system prompt)
  controller: null, // AbortController of the reply being streamed
};

// ---- server status, config and errors ---------------------------------------------------

function showError(message) {
  const banner = $("error");
  banner.textContent = message;
  banner.hidden = !message;
}

function setStatus(kind, text) {
  const el = $("status");
  el.className = `status status-${kind}`;
  el.textContent = text;
}

async function checkHealth() {
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      setStatus("ok", "ready");
      if (!state.config || !state.config.ready) await loadConfig();
    } else if (body.status === "loading") {
      setStatus("loading", "loading model…");
    } else {
      setStatus("down", "model failed to load");
      showError(`The model failed to load: ${body.message || response.status}`);
    }
  } catch (error) {
    setStatus("down", "server unreachable");
  }
}

async function loadConfig() {
  try {
    const response = await fetch("/config", { cache: "no-store" });
    const config = await response.json();
    const first = state.config === null;
    state.config = config;
    $("model-name").textContent = config.model;
    $("empty-model").textContent = config.model;
    document.title = `opencamp · ${config.model}`;
    $("api-key-box").hidden = !config.auth_required;
    if (config.max_context) {
      $("max-tokens-range").max = String(config.max_context);
      $("max-tokens").max = String(config.max_context);
    }
    const info = [`opencamp ${config.version}`];
    if (config.backend) info.push(`backend ${config.backend}`);
    if (config.max_context) info.push(`context ${config.max_context} tokens`);
    $("server-info").textContent = info.join(" · ");
    if (first) applyDefaults();
  } catch (error) {
    showError(`Cannot read the server's settings: ${error.message}`);
  }
}

function applyDefaults() {
  // The page's own start (chat-friendly when the model and the command set no sampling
  // defaults; the API keeps OpenAI's), else the server's defaults.
  const config = state.config || {};
  const d = config.page_defaults || config.defaults || {};
  const note = $("defaults-note");
  if (config.page_defaults_source === "chat") {
    note.textContent = "chat defaults: the model sets none (the API keeps OpenAI's)";
    note.hidden = false;
  } else {
    note.hidden = true;
  }
  const values = {
    "temperature": d.temperature ?? 1, "top-k": d.top_k ?? 0, "top-p": d.top_p ?? 1,
    "min-p": d.min_p ?? 0, "repetition-penalty": d.repetition_penalty ?? 1,
    "max-tokens": d.max_tokens ?? PAGE_MAX_TOKENS,
  };
  for (const [id, value] of Object.entries(values)) setControl(id, value);
  $("seed").value = d.seed ?? "";
}

function setControl(id, value) {
  $(id).value = String(value);
  const range = $(`${id}-range`);
  if (range) range.value = String(value);
}

function linkControls() {
  for (const [id] of CONTROLS) {
    const number = $(id);
    const range = $(`${id}-range`);
    range.addEventListener("input", () => { number.value = range.value; });
    number.addEventListener("input", () => { range.value = number.value; });
  }
  $("reset-defaults").addEventListener("click", applyDefaults);
}

// Read the controls now: settings apply to the next message, no reload needed.
function samplingSettings() {
  const settings = {};
  for (const [id, field, parse] of CONTROLS) {
    const raw = $(id).value.trim();
    if (raw === "") continue;
    const value = parse(raw);
    if (Number.isNaN(value)) throw new Error(`${field} must be a number`);
    settings[field] = value;
  }
  const seed = $("seed").value.trim();
  if (seed !== "") settings.seed = parseInt(seed, 10);
  return settings;
}

// ---- the conversation view ----------------------------------------------------------------

function addMessage(role, text) {
  $("empty").hidden = true;
  const item = document.createElement("div");
  item.className = `message ${role}`;
  item.innerHTML = `<div class="role">${role}</div><div class="content"></div><div class="stats"></div>`;
  const content = item.querySelector(".content");
  if (role === "user") content.textContent = text;
  else setMarkdown(content, text);
  $("messages").appendChild(item);
  scrollDown();
  return item;
}

function setMarkdown(element, text) {
  element.innerHTML = window.renderMarkdown(text);
  for (const pre of element.querySelectorAll("pre")) {
    const button = document.createElement("button");
    button.className = "copy";
    button.type = "button";
    button.textContent = "copy";
    button.addEventListener("click", () => {
      navigator.clipboard?.writeText(pre.querySelector("code").textContent);
      button.textContent = "copied";
    });
    pre.appendChild(button);
  }
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = false;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  for (const item of [...document.querySelectorAll(".message")]) item.remove();
  $("empty").hidden = false;
  showError("");
  $("prompt").focus();
}

// ---- sending and streaming --------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    detail = response.statusText;
  }
  if (response.status === 401) {
    $("api-key-box").hidden = false;
    return `The server needs an API key (HTTP 401): ${detail} Enter it under "API key".`;
  }
  return `The server answered HTTP ${response.status}: ${detail}`;
}

// Yields the parsed `data:` payloads of a server-sent-event stream.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function formatStats(s) {
  const parts = [];
  if (s.ttft != null) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.completionTokens != null) parts.push(`${s.completionTokens} tokens`);
  if (s.promptTokens != null) parts.push(`prompt ${s.promptTokens} (${s.cachedTokens} cached)`);
  if (s.finish) parts.push(s.finish);
  return parts.join(" · ");
}

async function send(text) {
  showError("");
  let settings;
  try {
    settings = samplingSettings();
  } catch (error) {
    showError(error.message);
    return;
  }
  const system = $("system-prompt").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : [])
    .concat(state.history, [{ role: "user", content: text }]);
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const content = reply.querySelector(".content");
  const stats = reply.querySelector(".stats");

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let answer = "";
  let firstAt = null;
  let lastAt = null;
  let chunks = 0;
  const info = { finish: null };
  let failed = null;
  let stopped = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: state.config ? state.config.model : undefined, messages, stream: true,
        stream_options: { include_usage: true }, ...settings,
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(`The server reported an error: ${chunk.error.message}`);
      if (chunk.usage) {
        info.promptTokens = chunk.usage.prompt_tokens;
        info.completionTokens = chunk.usage.completion_tokens;
        info.cachedTokens = chunk.usage.prompt_tokens_details?.cached_tokens ?? 0;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) info.finish = choice.finish_reason === "length" ? "stopped at max tokens" : null;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        const now = performance.now();
        if (firstAt === null) firstAt = now;
        lastAt = now;
        chunks += 1;
        answer += piece;
        setMarkdown(content, answer);
        stats.textContent = formatStats({ ttft: (firstAt - started) / 1000 });
        scrollDown();
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      stopped = true;
    } else if (error instanceof TypeError) {
      failed = `Cannot reach the server (${error.message}). Is opencamp serve still running?`;
    } else {
      failed = error.message;
    }
  } finally {
    state.controller = null;
    setBusy(false);
    reply.classList.remove("streaming");
  }

  if (answer) state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  if (failed) {
    showError(failed);
    if (!answer) {
      reply.classList.add("error");
      content.textContent = failed;
    }
  }
  const generated = info.completionTokens ?? chunks;
  const summary = {
    ttft: firstAt === null ? null : (firstAt - started) / 1000,
    tokensPerSecond: firstAt !== null && lastAt > firstAt && generated > 1
      ? (generated - 1) / ((lastAt - firstAt) / 1000) : null,
    completionTokens: info.completionTokens ?? null,
    promptTokens: info.promptTokens ?? null,
    cachedTokens: info.cachedTokens ?? 0,
    finish: stopped ? "stopped" : info.finish,
  };
  stats.textContent = formatStats(summary);
  if (stopped) stats.classList.add("note");
  reply.dataset.done = stopped ? "stopped" : failed ? "error" : "finished";
  scrollDown();
}

function main() {
  linkControls();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.controller) return;
    const text = $("prompt").value.trim();
    if (!text) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  const savedKey = localStorage.getItem("opencamp-api-key");
  if (savedKey) $("api-key").value = savedKey;
  $("api-key").addEventListener("change", () => localStorage.setItem("opencamp-api-key", $("api-key").value));
  loadConfig().then(checkHealth);
  setInterval(checkHealth, 5000);
  $("prompt").focus();
}

main();
