// Turning the page's state into DOM: the conversation's messages and the list of conversations.
// Model text reaches innerHTML only through renderMarkdown, which escapes it first; everything
// else is set with textContent.

import { renderMarkdown } from "./markdown.js";

const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children.filter(Boolean));
  return node;
};

const WHO = { user: "You", assistant: "Assistant", error: "Error" };

// opts: {actions: {edit, regenerate}} the buttons this message gets (only the last turn has them);
// streaming: this answer is still coming in.
export function messageView(message, { actions = {}, streaming = false } = {}) {
  const body = el("div", { class: "body" });
  if (message.role === "assistant") body.innerHTML = renderMarkdown(message.content);
  else body.textContent = message.content;
  const node = el(
    "article",
    { class: `msg ${message.role}`, "aria-label": WHO[message.role] },
    el("p", { class: "who", text: WHO[message.role], "aria-hidden": "true" }),
    body,
  );
  if (streaming) {
    // Screen readers wait for aria-busy to clear, then read the whole answer once, instead of
    // every re-render of it while it streams.
    node.setAttribute("aria-busy", "true");
    node.classList.add("streaming");
  }
  if (message.stats) node.append(el("p", { class: "stats", text: statsText(message.stats) }));
  const buttons = Object.entries(actions).map(([name, onclick]) =>
    el("button", { type: "button", class: `action ${name}`, text: LABELS[name], onclick }),
  );
  if (buttons.length) node.append(el("div", { class: "actions" }, ...buttons));
  return node;
}

const LABELS = { edit: "Edit", regenerate: "Regenerate" };

export function updateAnswer(node, message) {
  node.querySelector(".body").innerHTML = renderMarkdown(message.content);
}

export function statsText(stats) {
  const parts = [];
  if (stats.tokens != null) parts.push(`${stats.estimated ? "about " : ""}${stats.tokens} tokens`);
  if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (stats.firstTokenMs != null) {
    parts.push(`first token after ${(stats.firstTokenMs / 1000).toFixed(2)} s`);
  }
  if (stats.note) parts.push(stats.note);
  return parts.join(" · ");
}

// The form that replaces the last question while it is edited: Enter asks again, Escape cancels.
export function editView(message, { onSubmit, onCancel }) {
  const id = "edit-message";
  const box = el("textarea", { id, rows: "3", class: "edit-box" });
  box.value = message.content;
  const form = el(
    "form",
    { class: "msg user editing" },
    el("label", { for: id, text: "Edit your message" }),
    box,
    el(
      "div",
      { class: "actions" },
      el("button", { type: "submit", class: "action primary", text: "Ask again" }),
      el("button", { type: "button", class: "action", text: "Cancel", onclick: onCancel }),
    ),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (box.value.trim()) onSubmit(box.value);
  });
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    } else if (e.key === "Escape") {
      e.preventDefault();
      onCancel();
    }
  });
  return form;
}

export function chatListView(list, chats, currentId, { onOpen, onDelete }) {
  const items = [...chats]
    .sort((a, b) => b.updated - a.updated)
    .map((chat) =>
      el(
        "li",
        { class: chat.id === currentId ? "chat-item current" : "chat-item" },
        el("button", {
          type: "button",
          class: "open",
          text: chat.title,
          ...(chat.id === currentId ? { "aria-current": "true" } : {}),
          onclick: () => onOpen(chat.id),
        }),
        el("button", {
          type: "button",
          class: "delete",
          text: "Delete",
          "aria-label": `Delete ${chat.title}`,
          onclick: () => onDelete(chat.id),
        }),
      ),
    );
  list.replaceChildren(...items);
}
