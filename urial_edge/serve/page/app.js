// The urial-edge chat page: plain ES2020, no framework, no build step.
//
// It talks to the server's own OpenAI-compatible API (same origin):
//   GET  /v1/models            fills the model and prompt pickers
//   POST /v1/chat/completions  streams an answer (server-sent events)
// Conversations live in localStorage; an API key (if the server wants one) in sessionStorage.
// Model output is untrusted: it is rendered with marked and sanitized with DOMPurify, and the
// page's Content-Security-Policy forbids inline script on top of that.
"use strict";

const STORE_KEY = "urial-edge.conversations.v1";
const API_KEY_KEY = "urial-edge.api-key";
const DEFAULT_TITLE = "New conversation";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"), sidebar: $("sidebar"), sidebarToggle: $("sidebar-toggle"), list: $("conversation-list"),
  newButton: $("new-conversation"), title: $("conversation-title"), modelPicker: $("model-picker"),
  promptPicker: $("prompt-picker"), promptNote: $("prompt-note"), settings: $("settings"),
  systemText: $("system-text"), maxTokens: $("max-tokens"), messages: $("messages"), composer: $("composer"),
  input: $("composer-input"), send: $("send-button"), stop: $("stop-button"), keyDialog: $("key-dialog"),
  keyForm: $("key-form"), keyInput: $("key-input"), keyMessage: $("key-message"), keyCancel: $("key-cancel"),
};

const state = {
  conversations: [], // most recently used first
  currentId: null,
  catalog: [], // [{id, prompts: [...], defaultPrompt, loaded}] from /v1/models; prompts empty if unknown
  streaming: null, // {conversationId, message, controller} while an answer streams
  renderQueued: false,
};

// An error meant for the user: its message is shown in the conversation as is.
class PageError extends Error {}

// -- storage ---------------------------------------------------------------------------------

function loadConversations() {
  let saved = null;
  try {
    saved = JSON.parse(localStorage.getItem(STORE_KEY) || "null");
  } catch (err) {
    console.warn("urial-edge: unreadable saved conversations, starting afresh", err);
  }
  state.conversations = Array.isArray(saved?.conversations) ? saved.conversations : [];
  for (const conversation of state.conversations) {
    // An answer that was streaming when the page went away ends where it was last saved.
    for (const m of conversation.messages) {
      if (m.pending) {
        delete m.pending;
        m.finish = m.finish || "interrupted";
      }
    }
  }
  state.currentId = state.conversations.some((c) => c.id === saved?.currentId) ? saved.currentId : null;
}

function saveConversations() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify({ conversations: state.conversations, currentId: state.currentId }));
  } catch (err) {
    // Storage full or disabled: the conversation still works, it just will not survive a reload.
    console.warn("urial-edge: cannot save conversations", err);
  }
}

function createConversation() {
  const base = current();
  const conversation = {
    id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
    title: DEFAULT_TITLE,
    created: Date.now(),
    // a new conversation starts with the model and prompt in use, so the pickers do not jump
    model: base?.model ?? state.catalog[0]?.id ?? null,
    prompt: base?.prompt ?? null, // null: the model's default prompt
    system: "",
    maxTokens: null,
    messages: [],
  };
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  return conversation;
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

// The conversation being shown; an empty one is made if there is none, so there is always one.
function shown() {
  if (current()) return current();
  if (state.conversations.length) return selectConversation(state.conversations[0].id);
  return createConversation();
}

function selectConversation(id) {
  state.currentId = id;
  saveConversations();
  return current();
}

// -- markdown --------------------------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Raw HTML in an answer is shown as text: a model that writes <b> or <script> means the characters,
// and nothing it writes should become markup. DOMPurify below is a second, independent line.
const rawHtml = (token) => (token.block ? `<p class="raw-html">${escapeHtml(token.text.trim())}</p>` : escapeHtml(token.text));
marked.use({ gfm: true, breaks: true, renderer: { html: rawHtml } });

const PURIFY = {
  USE_PROFILES: { html: true }, // no SVG or MathML
  FORBID_TAGS: ["script", "style", "iframe", "frame", "object", "embed", "form", "input", "button", "textarea",
    "select", "link", "meta", "base", "template"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

// Links leave the page in a new tab, without giving it a handle back to this one.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) addCopyButton(pre);
  return fragment;
}

function addCopyButton(pre) {
  const block = document.createElement("div");
  block.className = "code-block";
  pre.replaceWith(block);
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-button";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    const ok = await copyText(pre.textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  block.append(button, pre);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch (err) {
      // denied: fall back to the selection below
    }
  }
  // Served on a LAN address (not a secure context) there is no clipboard API: copy a selection.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch (err) {
    ok = false;
  }
  area.remove();
  return ok;
}

// -- the API ---------------------------------------------------------------------------------

// fetch with the API key; on 401 it asks for a key (again, if the one sent was refused) and retries.
async function apiFetch(path, init = {}) {
  for (;;) {
    const key = sessionStorage.getItem(API_KEY_KEY);
    const headers = new Headers(init.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    if (sessionStorage.getItem(API_KEY_KEY) !== key) continue; // another request got a new key meanwhile
    sessionStorage.removeItem(API_KEY_KEY);
    await askForKey(Boolean(key));
  }
}

let keyRequest = null; // one dialog for every request that needs the key

function askForKey(refused) {
  if (keyRequest) return keyRequest;
  keyRequest = new Promise((resolve, reject) => {
    ui.keyMessage.textContent = refused
      ? "The server refused that key. Enter the key it was started with."
      : "This server needs an API key (the one given to urial-edge serve --api-key).";
    ui.keyInput.value = "";
    const finish = (key) => {
      ui.keyForm.removeEventListener("submit", onSubmit);
      ui.keyDialog.removeEventListener("close", onClose);
      keyRequest = null;
      if (ui.keyDialog.open) ui.keyDialog.close();
      if (key) {
        sessionStorage.setItem(API_KEY_KEY, key); // this tab only, gone when it closes
        resolve(key);
      } else {
        reject(new PageError("This server needs an API key, and none was given."));
      }
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const key = ui.keyInput.value.trim();
      if (key) finish(key);
    };
    const onClose = () => finish(null); // Esc or Cancel
    ui.keyForm.addEventListener("submit", onSubmit);
    ui.keyDialog.addEventListener("close", onClose);
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  });
  return keyRequest;
}

// The OpenAI-style error of a failed response, in words.
async function responseError(response) {
  let message = "";
  try {
    message = (await response.json())?.error?.message || "";
  } catch (err) {
    // not JSON: the status says enough
  }
  if (response.status === 429) {
    const wait = response.headers.get("Retry-After");
    return new PageError(`The server is busy; try again${wait ? ` in ${wait} s` : " soon"}. (${message || "no free slot"})`);
  }
  return new PageError(`The server answered ${response.status}: ${message || response.statusText || "error"}`);
}

// The chunks of a server-sent event stream, up to "data: [DONE]".
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

// -- models and prompts ----------------------------------------------------------------------

// /v1/models -> one entry per model. Entries with a "urial" object (the multi-model server) say which
// prompts a model can use; "<model>:<prompt>" entries only add prompts. Without "urial" (older
// servers) every entry is a model whose prompt the server chose.
function parseCatalog(body) {
  const models = new Map();
  for (const entry of Array.isArray(body?.data) ? body.data : []) {
    const urial = entry && typeof entry.urial === "object" && entry.urial ? entry.urial : null;
    const id = urial?.model || entry?.id;
    if (typeof id !== "string") continue;
    if (!models.has(id)) models.set(id, { id, prompts: [], defaultPrompt: null, loaded: null });
    const model = models.get(id);
    if (!urial) continue;
    for (const p of [...(urial.prompts || []), urial.prompt]) {
      if (typeof p === "string" && !model.prompts.includes(p)) model.prompts.push(p);
    }
    if (typeof urial.default_prompt === "string") model.defaultPrompt = urial.default_prompt;
    if (urial.prompt == null && typeof urial.loaded === "boolean") model.loaded = urial.loaded;
  }
  return [...models.values()];
}

async function loadModels() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw await responseError(response);
    state.catalog = parseCatalog(await response.json());
  } catch (err) {
    state.catalog = [];
    ui.promptNote.textContent = `Cannot list the models: ${describe(err)}`;
    return;
  }
  const conversation = shown();
  if (!conversation.model || !state.catalog.some((m) => m.id === conversation.model)) {
    conversation.model = state.catalog[0]?.id ?? null;
  }
  renderPickers();
}

function modelInfo(id) {
  return state.catalog.find((m) => m.id === id) || null;
}

// The prompt that shapes the answers of a conversation, or null if only the server knows it.
function promptOf(conversation) {
  const model = modelInfo(conversation.model);
  if (conversation.prompt && (!model || model.prompts.includes(conversation.prompt))) return conversation.prompt;
  return model?.defaultPrompt || null;
}

// What the request names: "<model>" for its default prompt, "<model>:<prompt>" for another one.
function requestedModel(conversation) {
  if (!conversation.model) return undefined;
  const prompt = promptOf(conversation);
  const model = modelInfo(conversation.model);
  return prompt && prompt !== model?.defaultPrompt ? `${conversation.model}:${prompt}` : conversation.model;
}

function option(value, text) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  return element;
}

function renderPickers() {
  const conversation = shown();
  const models = state.catalog.map((m) => option(m.id, m.loaded === false ? `${m.id} (loads when used)` : m.id));
  if (conversation.model && !modelInfo(conversation.model)) {
    models.push(option(conversation.model, `${conversation.model} (not on this server)`));
  }
  ui.modelPicker.replaceChildren(...models);
  ui.modelPicker.value = conversation.model || "";
  ui.modelPicker.disabled = models.length < 2;

  const model = modelInfo(conversation.model);
  if (model && model.prompts.length) {
    ui.promptPicker.replaceChildren(...model.prompts.map((p) => option(p, p === model.defaultPrompt ? `${p} (default)` : p)));
    ui.promptPicker.value = promptOf(conversation) || model.prompts[0];
    ui.promptPicker.disabled = false;
  } else {
    ui.promptPicker.replaceChildren(option("", "the server's"));
    ui.promptPicker.disabled = true;
  }
  const prompt = promptOf(conversation);
  ui.promptNote.textContent = prompt
    ? `Answers are shaped by the URIAL prompt ${prompt}: the base model continues its examples.`
    : "Answers are shaped by the server's URIAL prompt: the base model continues its examples.";
}

// -- sending and stopping --------------------------------------------------------------------

// The messages the server sees: the system text, then every finished turn, exactly as before,
// so that the server finds the conversation's stored state and only prefills what is new.
function requestMessages(conversation) {
  const messages = conversation.system.trim() ? [{ role: "system", content: conversation.system }] : [];
  for (const m of conversation.messages) {
    if ((m.role === "user" && !m.failed) || (m.role === "assistant" && !m.pending)) {
      messages.push({ role: m.role, content: m.content });
    }
  }
  return messages;
}

async function send() {
  const text = ui.input.value;
  if (!text.trim() || state.streaming) return;
  const conversation = shown();
  const question = { role: "user", content: text };
  conversation.messages.push(question);
  if (conversation.title === DEFAULT_TITLE) conversation.title = titleFrom(text);
  const body = { messages: requestMessages(conversation), stream: true, stream_options: { include_usage: true } };
  const model = requestedModel(conversation);
  if (model) body.model = model;
  if (conversation.maxTokens) body.max_tokens = conversation.maxTokens;

  const answer = { role: "assistant", content: "", model: conversation.model, prompt: promptOf(conversation), pending: true };
  conversation.messages.push(answer);
  moveToTop(conversation);
  ui.input.value = "";
  const controller = new AbortController();
  state.streaming = { conversationId: conversation.id, message: answer, controller };
  saveConversations();
  render();
  setBusy(true);

  let error = null;
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await responseError(response);
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new PageError(`The server stopped the answer: ${chunk.error.message || "error"}`);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        answer.content += choice.delta.content;
        queueRender();
      }
      if (choice?.finish_reason) answer.finish = choice.finish_reason;
      if (chunk.stats) answer.stats = chunk.stats;
      if (chunk.usage) answer.usage = chunk.usage;
    }
    if (!answer.finish) throw new PageError("The answer was cut off: the server closed the connection.");
  } catch (err) {
    if (err.name === "AbortError") answer.finish = "stopped";
    else error = err;
  }
  delete answer.pending;
  if (error) {
    answer.finish = "error";
    if (!answer.content) {
      // Nothing came back: leave this question out of later requests and offer its text again.
      conversation.messages.pop();
      question.failed = true;
      if (!ui.input.value) ui.input.value = text;
    }
    conversation.messages.push({ role: "error", content: describe(error) });
  }
  state.streaming = null;
  saveConversations();
  setBusy(false);
  render();
  ui.input.focus();
}

function describe(err) {
  if (err instanceof PageError) return err.message;
  if (err instanceof TypeError) return `Cannot reach the server (${err.message}). Is urial-edge serve still running?`;
  return `Something went wrong: ${err?.message || err}`;
}

// Stop the answer: closing the connection makes the server cancel it and free its slot.
function stop() {
  state.streaming?.controller.abort();
}

function setBusy(busy) {
  const hadFocus = document.activeElement === ui.send || document.activeElement === ui.stop;
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.messages.setAttribute("aria-busy", String(busy)); // screen readers read the answer once, not every frame
  if (hadFocus) (busy ? ui.stop : ui.input).focus(); // never leave the focus on a hidden button
}

function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line;
}

function moveToTop(conversation) {
  state.conversations = [conversation, ...state.conversations.filter((c) => c !== conversation)];
}

// -- rendering -------------------------------------------------------------------------------

function render() {
  renderSidebar();
  renderConversation();
}

function renderSidebar() {
  const items = state.conversations.map((conversation) => {
    const item = document.createElement("li");
    item.className = "conversation";
    item.dataset.id = conversation.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conversation-open";
    open.textContent = conversation.title;
    if (conversation.id === state.currentId) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => {
      selectConversation(conversation.id);
      setSidebar(false);
      render();
      renderPickers();
      ui.input.focus();
    });
    const rename = iconButton("✎", `Rename conversation: ${conversation.title}`, () => startRename(item, conversation));
    const remove = iconButton("✕", `Delete conversation: ${conversation.title}`, () => confirmDelete(remove, conversation));
    remove.classList.add("delete");
    item.append(open, rename, remove);
    return item;
  });
  ui.list.replaceChildren(...items);
}

function iconButton(symbol, label, onClick) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon";
  button.textContent = symbol;
  button.title = label;
  button.setAttribute("aria-label", label);
  button.addEventListener("click", onClick);
  return button;
}

// Rename in place: Enter or leaving the field keeps the new title, Esc keeps the old one.
function startRename(item, conversation) {
  const field = document.createElement("input");
  field.type = "text";
  field.className = "rename-field";
  field.value = conversation.title;
  field.setAttribute("aria-label", "New title");
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    const title = field.value.trim();
    if (keep && title) conversation.title = title;
    saveConversations();
    render();
    ui.list.querySelector(`[data-id="${conversation.id}"] .conversation-open`)?.focus();
  };
  field.addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); finish(true); }
    if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
  });
  field.addEventListener("blur", () => finish(true));
  item.replaceChildren(field);
  field.focus();
  field.select();
}

// Delete asks once more on the same button (no window.confirm: it would block the page).
function confirmDelete(button, conversation) {
  if (!button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = "Delete?";
    button.setAttribute("aria-label", `Really delete conversation: ${conversation.title}`);
    button.addEventListener("blur", () => renderSidebar(), { once: true });
    return;
  }
  if (state.streaming?.conversationId === conversation.id) stop();
  state.conversations = state.conversations.filter((c) => c !== conversation);
  if (state.currentId === conversation.id) state.currentId = state.conversations[0]?.id ?? null;
  shown();
  saveConversations();
  render();
  renderPickers();
  ui.input.focus();
}

function renderConversation() {
  const conversation = shown();
  ui.title.textContent = conversation.title;
  if (document.activeElement !== ui.systemText) ui.systemText.value = conversation.system;
  if (document.activeElement !== ui.maxTokens) ui.maxTokens.value = conversation.maxTokens ?? "";
  const elements = conversation.messages.map(messageElement);
  if (!elements.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask a question to start. The answer comes from a base model, aligned by its URIAL prompt.";
    elements.push(empty);
  }
  ui.messages.replaceChildren(...elements);
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function messageElement(message) {
  const element = document.createElement("article");
  element.className = `message ${message.role}`;
  if (message.failed) element.classList.add("failed");
  const label = { user: "You", assistant: "Answer", error: "Error" }[message.role] || message.role;
  element.setAttribute("aria-label", label);
  const body = document.createElement("div");
  body.className = "message-body";
  if (message.role === "assistant") {
    body.append(renderMarkdown(message.content));
    if (message.pending) element.classList.add("pending");
  } else {
    body.textContent = message.content; // what the user typed, and our own error texts, are plain text
  }
  element.append(body);
  if (message.role === "error") element.setAttribute("role", "alert");
  if (message.role === "assistant" && !message.pending) {
    const stats = document.createElement("p");
    stats.className = "stats";
    stats.textContent = statsText(message);
    element.append(stats);
  }
  if (message === state.streaming?.message) state.streaming.element = element;
  return element;
}

// "gemma-3-270m · urial-k4-direct · first token 0.12 s · 45.3 tokens/s · 120 cached tokens"
function statsText(message) {
  const parts = [message.model, message.prompt].filter(Boolean);
  const s = message.stats;
  if (s) {
    parts.push(`first token ${s.ttft.toFixed(2)} s`, `${s.generation_tps.toFixed(1)} tokens/s`);
    const cached = message.usage?.prompt_tokens_details?.cached_tokens ?? s.cached_tokens;
    if (cached != null) parts.push(`${cached} cached tokens`);
  }
  if (message.finish && message.finish !== "stop") {
    parts.push({ stopped: "stopped", length: "cut at the token limit", interrupted: "interrupted", error: "cut off" }[message.finish]
      || `finish: ${message.finish}`);
  }
  return parts.join(" · ");
}

// Streaming text is re-rendered at most once a frame, however fast the tokens come.
function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    const streaming = state.streaming;
    if (!streaming?.element || !streaming.element.isConnected) return;
    const nearBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
    streaming.element.querySelector(".message-body").replaceChildren(renderMarkdown(streaming.message.content));
    if (nearBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
  });
}

function setSidebar(open) {
  ui.app.classList.toggle("sidebar-open", open);
  ui.sidebarToggle.setAttribute("aria-expanded", String(open));
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || ui.keyDialog.open) return;
    if (state.streaming) stop();
    else if (ui.app.classList.contains("sidebar-open")) setSidebar(false);
  });
  ui.newButton.addEventListener("click", () => {
    const conversation = current();
    if (!conversation || conversation.messages.length) createConversation(); // one empty one is enough
    saveConversations();
    setSidebar(false);
    render();
    renderPickers();
    ui.input.focus();
  });
  ui.sidebarToggle.addEventListener("click", () => setSidebar(!ui.app.classList.contains("sidebar-open")));
  ui.modelPicker.addEventListener("change", () => {
    const conversation = shown();
    conversation.model = ui.modelPicker.value || null;
    conversation.prompt = null; // the new model's default prompt
    saveConversations();
    renderPickers();
  });
  ui.promptPicker.addEventListener("change", () => {
    shown().prompt = ui.promptPicker.value || null;
    saveConversations();
    renderPickers();
  });
  ui.systemText.addEventListener("input", () => {
    shown().system = ui.systemText.value;
    saveConversations();
  });
  ui.maxTokens.addEventListener("input", () => {
    const value = Number.parseInt(ui.maxTokens.value, 10);
    shown().maxTokens = Number.isFinite(value) && value > 0 ? value : null;
    saveConversations();
  });
  ui.keyCancel.addEventListener("click", () => ui.keyDialog.close());
  // Another tab changed the conversations: show them, unless an answer is streaming here.
  window.addEventListener("storage", (event) => {
    if (event.key !== STORE_KEY || state.streaming) return;
    loadConversations();
    render();
    renderPickers();
  });
}

function main() {
  loadConversations();
  shown();
  wire();
  render();
  renderPickers();
  ui.input.focus();
  loadModels();
}

main();
