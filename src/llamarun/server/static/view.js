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
// streaming: this answer is still coming in; edited: this question is being edited in the composer.
export function messageView(message, { actions = {}, streaming = false, edited = false } = {}) {
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
  if (edited) node.classList.add("edited");
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
  if (stats.tokens) parts.push(`${stats.estimated ? "about " : ""}${stats.tokens} tokens`);
  if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (stats.firstTokenMs != null) {
    parts.push(`time to first token ${(stats.firstTokenMs / 1000).toFixed(2)} s`);
  }
  if (stats.note) parts.push(stats.note);
  return parts.join(" · ");
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

// Copy buttons of code blocks: one listener for all, as answers are re-rendered while streaming.
export function copyButtons(container) {
  container.addEventListener("click", async (e) => {
    const button = e.target.closest("button.copy");
    if (!button) return;
    const code = button.closest(".code-block").querySelector("code").textContent;
    const done = await copyText(code);
    button.textContent = done ? "Copied" : "Copy failed";
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  });
}

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
