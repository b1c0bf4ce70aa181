// The chat page: the conversation and its composer, asking the API (api.js) and keeping
// conversations in the browser (store.js); the DOM is built by view.js, the settings are
// settings.js, the drawers at phone width panels.js.

import { ApiError, streamChat } from "./api.js";
import { closePanels, openPanel, setupPanels } from "./panels.js";
import { setupSettings } from "./settings.js";
import * as store from "./store.js";
import { chatListView, copyButtons, messageView, updateAnswer } from "./view.js";

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
  editingNote: $("editing-note"),
};

const state = {
  chats: store.loadChats(),
  currentId: store.loadCurrent(),
  settings: store.loadSettings(),
  apiKey: store.loadApiKey(),
  busy: null, // the answer being streamed: {chat, message, controller}
  editing: null, // editing the last question in the composer: {draft} (what the composer held)
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
    const actions = {};
    if (idle && !state.editing && i === lastUser) actions.edit = startEdit;
    if (idle && !state.editing && i === messages.length - 1 && i > lastUser && lastUser >= 0) {
      actions.regenerate = regenerate;
    }
    const streaming = state.busy?.message === message;
    const edited = !!state.editing && i === lastUser;
    const node = messageView(message, { actions, streaming, edited });
    if (streaming) answerNode = node;
    return node;
  });
  ui.messages.replaceChildren(...nodes);
  ui.empty.hidden = messages.length > 0;
  ui.editingNote.hidden = !state.editing;
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
  // a click on Send or Regenerate moves to Stop (Send hides, Regenerate goes with the re-render)
  if (busy && hadFocus !== ui.input) ui.stop.focus();
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
  if (state.editing) return resend(text);
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

// Editing happens in the composer: the last question's text goes there, and Send replaces the
// question (and what came after it) and asks again.
function startEdit() {
  const chat = currentChat();
  const lastUser = chat.messages.findLastIndex((m) => m.role === "user");
  state.editing = { draft: ui.input.value };
  ui.input.value = chat.messages[lastUser].content;
  render();
  ui.input.focus();
  ui.input.setSelectionRange(ui.input.value.length, ui.input.value.length);
}

// Leaves editing; the composer gets back what it held before.
function endEdit() {
  if (!state.editing) return;
  ui.input.value = state.editing.draft;
  state.editing = null;
}

function cancelEdit() {
  endEdit();
  render();
  ui.input.focus();
}

function resend(text) {
  const chat = currentChat();
  endEdit();
  const lastUser = chat.messages.findLastIndex((m) => m.role === "user");
  chat.messages.splice(lastUser);
  if (lastUser === 0) chat.title = store.titleOf(text);
  chat.messages.push({ role: "user", content: text });
  answer(chat);
}

// ---- conversations ---------------------------------------------------------------------------

function openChat(id) {
  state.currentId = id;
  endEdit();
  save();
  render();
  closePanels();
  ui.input.focus();
}

function deleteChat(id) {
  if (state.busy?.chat.id === id) stop();
  if (state.currentId === id) endEdit();
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  save();
  render();
  ui.input.focus();
}

function startNewChat() {
  state.currentId = null;
  endEdit();
  save();
  render();
  closePanels();
  ui.input.focus();
}

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  const open = document.querySelector(".panel.open");
  if (open) {
    closePanels();
    $(`toggle-${open.id}`).focus();
  } else if (state.editing) {
    cancelEdit();
  } else if (state.busy) {
    stop();
  }
});

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
$("cancel-edit").addEventListener("click", cancelEdit);
$("new-chat").addEventListener("click", startNewChat);

const { loadModels } = setupSettings(state, { showBanner, modelName: ui.modelName });
setupPanels();
copyButtons(ui.messages);
render();
loadModels();
ui.input.focus();
