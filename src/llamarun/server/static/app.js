// The chat page: wires the composer, the conversation list and the settings to the API
// (api.js), the browser's storage (store.js) and the DOM (view.js).

import { ApiError, listModels, streamChat } from "./api.js";
import * as store from "./store.js";
import { chatListView, editView, messageView, updateAnswer } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  banner: $("banner"),
  chatList: $("chat-list"),
  noChats: $("no-chats"),
  modelName: $("model-name"),
};

const state = {
  chats: store.loadChats(),
  currentId: store.loadCurrent(),
  settings: store.loadSettings(),
  apiKey: store.loadApiKey(),
  busy: null, // the answer being streamed: {chat, message, controller}
  editing: false,
};

const currentChat = () => state.chats.find((c) => c.id === state.currentId) ?? null;

function save() {
  if (!store.saveChats(state.chats) || !store.saveCurrent(state.currentId)) {
    showBanner("This browser refused to store the conversation (its storage is full or switched off), so it will be lost when the page is reloaded.");
  }
}

function showBanner(text) {
  ui.banner.textContent = text;
  ui.banner.hidden = !text;
}

// ---- rendering -------------------------------------------------------------------------------

let answerNode = null; // the streaming answer's element, updated in place

function render() {
  const chat = currentChat();
  const messages = chat?.messages ?? [];
  const lastUser = messages.findLastIndex((m) => m.role === "user");
  const idle = !state.busy;
  answerNode = null;
  const nodes = messages.map((message, i) => {
    if (state.editing && i === lastUser) {
      return editView(message, { onSubmit: resend, onCancel: cancelEdit });
    }
    const actions = {};
    if (idle && i === lastUser) actions.edit = startEdit;
    if (idle && i === messages.length - 1 && i > lastUser && lastUser >= 0) {
      actions.regenerate = regenerate;
    }
    const streaming = state.busy?.message === message;
    const node = messageView(message, { actions, streaming });
    if (streaming) answerNode = node;
    return node;
  });
  ui.messages.replaceChildren(...nodes);
  ui.empty.hidden = messages.length > 0;
  chatListView(ui.chatList, state.chats, state.currentId, { onOpen: openChat, onDelete: deleteChat });
  ui.noChats.hidden = state.chats.length > 0;
  scrollToEnd(true);
}

function scrollToEnd(force) {
  const box = ui.messages;
  const nearEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  if (force || nearEnd) box.scrollTop = box.scrollHeight;
}

// Re-rendering the markdown once per frame keeps a fast model from re-rendering per token.
let frameAsked = false;
function renderAnswerSoon() {
  if (frameAsked) return;
  frameAsked = true;
  requestAnimationFrame(() => {
    frameAsked = false;
    if (answerNode && state.busy) {
      updateAnswer(answerNode, state.busy.message);
      scrollToEnd(false);
    }
  });
}

function setBusy(busy) {
  const hadFocus = document.activeElement;
  state.busy = busy;
  ui.send.hidden = !!busy;
  ui.stop.hidden = !busy;
  if (busy && hadFocus === ui.send) ui.stop.focus();
  if (!busy && (hadFocus === ui.stop || hadFocus === document.body)) ui.input.focus();
}

// ---- asking ----------------------------------------------------------------------------------

function requestBody(chat) {
  const s = state.settings;
  const messages = chat.messages
    .filter((m) => m.role === "user" || m.role === "assistant")
    .map(({ role, content }) => ({ role, content }));
  if (s.system.trim()) messages.unshift({ role: "system", content: s.system });
  const body = { messages };
  if (s.model) body.model = s.model;
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    if (s[name] != null) body[name] = s[name];
  }
  return body;
}

function send(text) {
  if (state.busy || !text.trim()) return;
  let chat = currentChat();
  if (!chat) {
    chat = store.newChat();
    state.chats.push(chat);
    state.currentId = chat.id;
  }
  if (chat.messages.length === 0) chat.title = store.titleOf(text);
  chat.messages.push({ role: "user", content: text });
  ui.input.value = "";
  answer(chat);
}

async function answer(chat) {
  const message = { role: "assistant", content: "" };
  const controller = new AbortController();
  const body = requestBody(chat);
  chat.messages.push(message);
  chat.updated = Date.now();
  setBusy({ chat, message, controller });
  save();
  render();

  const started = performance.now();
  let first = null;
  let pieces = 0;
  let lastSave = started;
  const stats = (usage, note) => {
    const end = performance.now();
    const tokens = usage?.completion_tokens ?? pieces;
    const seconds = first === null ? 0 : (end - first) / 1000;
    return {
      tokens,
      estimated: !usage,
      tokensPerSecond: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
      firstTokenMs: first === null ? null : first - started,
      note,
    };
  };
  try {
    const result = await streamChat(body, {
      apiKey: state.apiKey,
      signal: controller.signal,
      onText(piece) {
        first ??= performance.now();
        pieces++;
        message.content += piece;
        renderAnswerSoon();
        if (performance.now() - lastSave > 1000) {
          lastSave = performance.now();
          save(); // a reload while it streams keeps what has come so far
        }
      },
    });
    const note = result.finishReason === "length" ? "cut off at Max tokens" : undefined;
    message.stats = stats(result.usage, note);
  } catch (e) {
    if (e.name === "AbortError") {
      message.stats = stats(null, "stopped");
    } else {
      failed(chat, message, e);
    }
  }
  setBusy(null);
  save();
  if (chat === currentChat()) {
    render();
    announceError();
  }
}

function failed(chat, message, error) {
  const text =
    error instanceof ApiError ? error.message : `Something went wrong in the page: ${error.message}`;
  if (!message.content) chat.messages.splice(chat.messages.indexOf(message), 1);
  chat.messages.push({ role: "error", content: text });
  if (error.kind === "auth") openPanel("settings", $("api-key"));
}

// A fresh error is announced at once, not only politely after the rest of the log.
function announceError() {
  const last = ui.messages.lastElementChild;
  if (last?.classList.contains("error")) last.setAttribute("role", "alert");
}

function stop() {
  state.busy?.controller.abort();
}

// Drops what came after the last question (its answer, or an error) and asks it again.
function regenerate() {
  const chat = currentChat();
  if (state.busy || !chat) return;
  const lastUser = chat.messages.findLastIndex((m) => m.role === "user");
  chat.messages.splice(lastUser + 1);
  answer(chat);
}

function startEdit() {
  state.editing = true;
  render();
  $("edit-message").focus();
}

function cancelEdit() {
  state.editing = false;
  render();
  ui.input.focus();
}

function resend(text) {
  const chat = currentChat();
  state.editing = false;
  if (state.busy || !chat) return;
  const lastUser = chat.messages.findLastIndex((m) => m.role === "user");
  chat.messages.splice(lastUser);
  if (lastUser === 0) chat.title = store.titleOf(text);
  chat.messages.push({ role: "user", content: text });
  answer(chat);
  ui.input.focus();
}

// ---- conversations ---------------------------------------------------------------------------

function openChat(id) {
  state.currentId = id;
  state.editing = false;
  save();
  render();
  closePanels();
  ui.input.focus();
}

function deleteChat(id) {
  if (state.busy?.chat.id === id) stop();
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  save();
  render();
  ui.input.focus();
}

function startNewChat() {
  state.currentId = null;
  state.editing = false;
  save();
  render();
  closePanels();
  ui.input.focus();
}

// ---- panels (drawers at phone width; always shown on a wide screen) --------------------------

function openPanel(name, focus) {
  const panel = $(name);
  panel.classList.add("open");
  $(`toggle-${name}`).setAttribute("aria-expanded", "true");
  (focus ?? panel.querySelector("button, input, select, textarea"))?.focus({ preventScroll: true });
}

function closePanels() {
  for (const name of ["chats", "settings"]) {
    $(name).classList.remove("open");
    $(`toggle-${name}`).setAttribute("aria-expanded", "false");
  }
}

for (const name of ["chats", "settings"]) {
  $(`toggle-${name}`).addEventListener("click", () => {
    const open = $(name).classList.contains("open");
    closePanels();
    if (!open) openPanel(name);
  });
}

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  const open = document.querySelector(".panel.open");
  if (open) {
    closePanels();
    $(`toggle-${open.id}`).focus();
  } else if (state.busy) {
    stop();
  }
});

// ---- settings --------------------------------------------------------------------------------

const FIELDS = { temperature: "temperature", "top-p": "top_p", "max-tokens": "max_tokens", seed: "seed" };
const INTEGERS = new Set(["max_tokens", "seed"]);

function showSettings() {
  const s = state.settings;
  $("system").value = s.system;
  for (const [id, name] of Object.entries(FIELDS)) $(id).value = s[name] ?? "";
  $("api-key").value = state.apiKey;
}

function readSettings() {
  const s = state.settings;
  s.system = $("system").value;
  for (const [id, name] of Object.entries(FIELDS)) {
    const raw = $(id).value.trim();
    s[name] = raw === "" ? null : Number(raw);
  }
  // Off the arrows' step is fine for the decimals; out of range or a fraction of a token is not.
  const bad = Object.entries(FIELDS).filter(([id, name]) => {
    const v = $(id).validity;
    return v.badInput || v.rangeUnderflow || v.rangeOverflow || (v.stepMismatch && INTEGERS.has(name));
  });
  $("settings-error").textContent = bad.length
    ? `Check ${bad.map(([id]) => $(id).labels[0].textContent).join(", ")}: the server will refuse ${bad.length > 1 ? "these values" : "this value"}.`
    : "";
  store.saveSettings(s);
}

for (const id of ["system", ...Object.keys(FIELDS)]) $(id).addEventListener("input", readSettings);

$("model").addEventListener("change", (e) => {
  state.settings.model = e.target.value;
  ui.modelName.textContent = e.target.value;
  store.saveSettings(state.settings);
});

$("api-key").addEventListener("change", (e) => {
  state.apiKey = e.target.value.trim();
  store.saveApiKey(state.apiKey);
  loadModels();
});

async function loadModels() {
  const select = $("model");
  try {
    const models = await listModels(state.apiKey);
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (!models.includes(state.settings.model)) state.settings.model = models[0] ?? "";
    select.value = state.settings.model;
    ui.modelName.textContent = state.settings.model;
    showBanner("");
  } catch (e) {
    select.replaceChildren(new Option("(not available)", ""));
    state.settings.model = "";
    showBanner(e.message);
  }
}

// ---- composer --------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send(ui.input.value);
});

ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send(ui.input.value);
  }
});

ui.stop.addEventListener("click", stop);
$("new-chat").addEventListener("click", startNewChat);

// Copy buttons of code blocks: one listener for all, as answers are re-rendered while streaming.
ui.messages.addEventListener("click", async (e) => {
  const button = e.target.closest("button.copy");
  if (!button) return;
  const code = button.closest(".code-block").querySelector("code").textContent;
  const done = await copyText(code);
  button.textContent = done ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
});

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // navigator.clipboard exists only on https or localhost pages: fall back for the others
    const area = Object.assign(document.createElement("textarea"), { value: text });
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    const done = document.execCommand("copy");
    area.remove();
    return done;
  }
}

showSettings();
render();
loadModels();
ui.input.focus();
