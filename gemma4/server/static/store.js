// What the page keeps in the browser (localStorage): the conversations, the current one, the settings.
//
// A conversation: {id, title, created, messages}; a message: {role: "user", content, attachments} or
// {role: "assistant", content, reasoning, error, stopped, usage}. Attachments: {kind: "image", name, url}
// or {kind: "audio", name, format, data} (base64), as the API takes them.

export const CONVERSATIONS = "gemma4.conversations";
const CURRENT = "gemma4.current";
const SETTINGS = "gemma4.settings";

export const DEFAULT_SETTINGS = { model: "", system: "", temperature: 0.7, top_p: 0.95, max_tokens: 1024,
                                  thinking: false };

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;  // written by something else: start afresh rather than fail to load
  }
}

export function loadSettings() {
  return { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

export function loadConversations() {
  const list = read(CONVERSATIONS, []);
  return Array.isArray(list) ? list.filter((c) => c && c.id && Array.isArray(c.messages)) : [];
}

// Saves the list; where the browser's quota is full, it is saved without the attachments' data (their
// names stay) and the caller learns that some were not kept.
export function saveConversations(list) {
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
    return true;
  } catch (e) {
    if (e.name !== "QuotaExceededError") throw e;
  }
  const lighter = list.map((c) => ({ ...c, messages: c.messages.map((m) => (m.attachments ? {
    ...m, attachments: m.attachments.map((a) => ({ kind: a.kind, name: a.name, format: a.format, dropped: true })),
  } : m)) }));
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(lighter));
  } catch { /* the text alone does not fit either: what was saved before stays */ }
  return false;
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

export function setCurrentId(id) {
  if (id) localStorage.setItem(CURRENT, id);
  else localStorage.removeItem(CURRENT);
}

export function newConversation() {
  const id = (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
  return { id, title: "New chat", created: Date.now(), messages: [] };
}
