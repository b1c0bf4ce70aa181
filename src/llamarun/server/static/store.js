// What the page keeps in this browser's localStorage: the conversations, which one is open,
// the settings and the API key. Nothing of it is sent anywhere but to this server's API.
//
// A conversation is {id, title, updated, messages}; a message is {role, content} with role
// "user" or "assistant", plus "stats" on answers, or role "error" for a failure shown in the
// conversation (never sent to the model).

const CHATS = "llamarun.chats";
const CURRENT = "llamarun.current";
const SETTINGS = "llamarun.settings";
const API_KEY = "llamarun.apiKey";

// Greedy by default: the small models people start with wander off at higher temperatures.
export const DEFAULT_SETTINGS = {
  model: "",
  system: "",
  temperature: 0,
  top_p: 1,
  max_tokens: 512,
  seed: null,
};

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback; // missing, unreadable, or storage switched off: start afresh
  }
}

// Returns false when the browser refuses (storage full or switched off), so the page can say so.
function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
}

export function loadChats() {
  const chats = read(CHATS, []);
  return Array.isArray(chats) ? chats.filter((c) => c && Array.isArray(c.messages)) : [];
}

export const saveChats = (chats) => write(CHATS, chats);
export const loadCurrent = () => read(CURRENT, null);
export const saveCurrent = (id) => write(CURRENT, id);
export const loadSettings = () => ({ ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) });
export const saveSettings = (settings) => write(SETTINGS, settings);
export const loadApiKey = () => read(API_KEY, "");
export const saveApiKey = (key) => write(API_KEY, key);

export function newChat() {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", updated: Date.now(), messages: [] };
}

export function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || "New chat";
}
