// The chat page: conversations on the left, the open one in the middle, answers streamed from the server.

import { APIError, NeedsKey, apiKey, listModels, streamChat } from "./api.js";
import { attachment, contentOf } from "./attach.js";
import { renderMarkdown } from "./markdown.js";
import * as store from "./store.js";

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

let conversations = store.loadConversations();
let current = null;
let settings = store.loadSettings();
let pending = [];         // attachments for the next message
let controller = null;    // the AbortController of the answer being streamed

// ---- notices and the API key ------------------------------------------------------------------
function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function askKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key").value = apiKey.get();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "save";
      if (saved) apiKey.set($("key").value.trim());
      resolve(saved);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function withKey(call) {
  for (;;) {
    try {
      return await call();
    } catch (e) {
      if (!(e instanceof NeedsKey)) throw e;
      const reason = apiKey.get() ? `The server refused the API key: ${e.message}` : "This server needs an API key.";
      if (!(await askKey(reason))) throw new APIError(401, e.message);
    }
  }
}

// ---- models and settings ----------------------------------------------------------------------
async function loadModels() {
  try {
    const models = await withKey(listModels);
    const select = $("model");
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (!models.some((m) => m.id === settings.model)) settings.model = models[0]?.id || "";
    select.value = settings.model;
    const card = models.find((m) => m.id === settings.model);
    $("server-model").textContent = card ? card.id : "";
    // a server that lists capabilities and leaves thinking out has nothing to switch on
    const caps = card?.capabilities;
    $("thinking").disabled = Array.isArray(caps) && !caps.includes("thinking");
    notice("");
  } catch (e) {
    notice(`Could not list the server's models: ${e.message}`);
  }
}

const FIELDS = { system: "value", temperature: "value", "top-p": "value", "max-tokens": "value", thinking: "checked",
                 model: "value" };
const KEYS = { "top-p": "top_p", "max-tokens": "max_tokens" };

function showSettings() {
  for (const [id, prop] of Object.entries(FIELDS)) $(id)[prop] = settings[KEYS[id] || id];
}

function readSettings() {
  const number = (id, fallback) => {
    const v = Number($(id).value);
    return $(id).value !== "" && Number.isFinite(v) ? v : fallback;
  };
  settings = {
    model: $("model").value, system: $("system").value, thinking: $("thinking").checked,
    temperature: number("temperature", store.DEFAULT_SETTINGS.temperature),
    top_p: number("top-p", store.DEFAULT_SETTINGS.top_p),
    max_tokens: Math.round(number("max-tokens", store.DEFAULT_SETTINGS.max_tokens)),
  };
  store.saveSettings(settings);
  $("server-model").textContent = settings.model;
}

// ---- conversations ----------------------------------------------------------------------------
function save() {
  if (!store.saveConversations(conversations)) {
    notice("The browser's storage is full: attachments of this conversation were not kept.");
  }
  store.setCurrentId(current?.id);
}

function open(conversation) {
  if (controller) controller.abort();
  current = conversation;
  store.setCurrentId(current.id);
  renderList();
  renderMessages();
  $("prompt").focus();
}

function startNew() {
  // an empty conversation is reused rather than piled up
  const empty = conversations.find((c) => !c.messages.length);
  if (empty) return open(empty);
  const c = store.newConversation();
  conversations.unshift(c);
  save();
  open(c);
}

function remove(conversation) {
  if (conversation === current && controller) controller.abort();
  conversations = conversations.filter((c) => c !== conversation);
  if (conversation === current) current = null;
  save();
  if (current) renderList();
  else if (conversations.length) open(conversations[0]);
  else startNew();
}

function renderList() {
  const items = conversations.map((c) => {
    const li = el("li", c === current ? "active" : "");
    const pick = el("button", "pick", c.title);
    pick.type = "button";
    pick.title = c.title;
    pick.addEventListener("click", () => open(c));
    const del = el("button", "delete", "×");
    del.type = "button";
    del.title = "Delete this conversation";
    del.setAttribute("aria-label", `Delete ${c.title}`);
    del.addEventListener("click", () => remove(c));
    li.append(pick, del);
    return li;
  });
  $("conversations").replaceChildren(...items);
  $("title").textContent = current?.title || "New chat";
}

// ---- messages ---------------------------------------------------------------------------------
function attachmentElement(a) {
  const box = el("figure", "attachment");
  if (a.dropped) {
    box.append(el("figcaption", "", `${a.name} (not kept: the browser's storage was full)`));
  } else if (a.kind === "image") {
    const img = el("img");
    img.src = a.url;
    img.alt = a.name;
    box.append(img);
  } else {
    const audio = el("audio");
    audio.controls = true;
    audio.src = `data:audio/${a.format === "mp3" ? "mpeg" : "wav"};base64,${a.data}`;
    box.append(audio, el("figcaption", "", a.name));
  }
  return box;
}

function fillAssistant(box, m) {
  box.dataset.state = m.error ? "error" : m.stopped ? "stopped" : m.done ? "done" : "streaming";
  let thinking = box.querySelector(".thinking");
  if (m.reasoning && !thinking) {
    thinking = el("details", "thinking");
    thinking.append(el("summary"), el("div", "reasoning"));
    box.prepend(thinking);
  }
  if (thinking) {
    thinking.querySelector("summary").textContent = m.content || m.done || m.stopped ? "Thought" : "Thinking…";
    thinking.querySelector(".reasoning").textContent = m.reasoning;
  }
  // safe: renderMarkdown escapes all of the model's text and writes only its own tags
  box.querySelector(".answer").innerHTML = renderMarkdown(m.content);
  box.querySelector(".error").textContent = m.error || "";
  const meta = [];
  if (m.stopped) meta.push("stopped");
  if (m.finish === "length") meta.push("cut at the token limit");
  if (m.usage) meta.push(`${m.usage.completion_tokens} tokens` + (m.rate ? ` · ${m.rate.toFixed(1)} tok/s` : ""));
  box.querySelector(".meta").textContent = meta.join(" · ");
}

function messageElement(m) {
  const box = el("article", `msg ${m.role}`);
  if (m.role === "user") {
    for (const a of m.attachments || []) box.append(attachmentElement(a));
    if (m.content) box.append(el("div", "text", m.content));
  } else {
    box.append(el("div", "answer"), el("div", "error"), el("div", "meta"));
    fillAssistant(box, m);
  }
  return box;
}

function renderMessages() {
  $("messages").replaceChildren(...(current?.messages || []).map(messageElement));
  scrollDown(true);
}

function scrollDown(force) {
  const list = $("messages");
  if (force || list.scrollHeight - list.scrollTop - list.clientHeight < 80) list.scrollTop = list.scrollHeight;
}

// The history as the API takes it: a turn whose answer failed is left out (the model never saw it).
function history() {
  const messages = settings.system ? [{ role: "system", content: settings.system }] : [];
  const turns = current.messages;
  for (let i = 0; i < turns.length; i++) {
    const m = turns[i];
    if (m.role === "user" && turns[i + 1]?.error) { i++; continue; }
    if (m.role === "user") messages.push({ role: "user", content: contentOf(m) });
    else if (!m.error && m.done) messages.push({ role: "assistant", content: m.content });
  }
  return messages;
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("composer").classList.toggle("busy", on);
}

async function send() {
  const text = $("prompt").value.trim();
  if (controller || (!text && !pending.length)) return;
  readSettings();
  const conversation = current;
  if (!conversation.messages.length) conversation.title = (text || pending[0].name).slice(0, 48);
  conversation.messages.push({ role: "user", content: text, attachments: pending.length ? pending : undefined });
  const messages = history();
  const answer = { role: "assistant", content: "", reasoning: "" };
  conversation.messages.push(answer);
  $("prompt").value = "";
  pending = [];
  renderAttachments();
  save();
  renderList();
  renderMessages();
  const box = $("messages").lastElementChild;

  controller = new AbortController();
  busy(true);
  const body = { model: settings.model || undefined, messages, temperature: settings.temperature,
                 top_p: settings.top_p, max_tokens: settings.max_tokens,
                 chat_template_kwargs: { enable_thinking: settings.thinking && !$("thinking").disabled } };
  let first = 0;
  try {
    const { finish, usage } = await withKey(() => streamChat(body, controller.signal, (delta) => {
      first ||= performance.now();
      answer.content += delta.content;
      answer.reasoning += delta.reasoning;
      if (current === conversation) { fillAssistant(box, answer); scrollDown(); }
    }));
    answer.finish = finish;
    answer.usage = usage;
    const seconds = (performance.now() - first) / 1000;
    if (usage && first && seconds > 0 && usage.completion_tokens > 1) answer.rate = (usage.completion_tokens - 1) / seconds;
  } catch (e) {
    if (e.name === "AbortError") answer.stopped = true;
    else answer.error = e.message || String(e);
  } finally {
    answer.done = true;
    controller = null;
    busy(false);
    if (!answer.reasoning) delete answer.reasoning;
    save();
    if (current === conversation) fillAssistant(box, answer);
  }
}

// ---- attachments ------------------------------------------------------------------------------
function renderAttachments() {
  $("attachments").replaceChildren(...pending.map((a, i) => {
    const chip = attachmentElement(a);
    const x = el("button", "unattach", "×");
    x.type = "button";
    x.title = `Remove ${a.name}`;
    x.addEventListener("click", () => { pending.splice(i, 1); renderAttachments(); });
    chip.append(x);
    return chip;
  }));
}

async function addFiles(files) {
  for (const file of files) {
    try {
      pending.push(await attachment(file));
    } catch (e) {
      notice(e.message);
    }
  }
  renderAttachments();
}

// ---- wiring -----------------------------------------------------------------------------------
function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", startNew);
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("conversations").addEventListener("click", (e) => {
    if (e.target.closest(".pick")) document.body.classList.remove("sidebar-open");  // narrow screens: back to the chat
  });
  $("file").addEventListener("change", async (e) => { await addFiles([...e.target.files]); e.target.value = ""; });
  for (const id of Object.keys(FIELDS)) $(id).addEventListener("change", readSettings);
  $("change-key").addEventListener("click", async () => {
    if (await askKey("The server's API key (leave empty for none):")) loadModels();
  });
  // another tab changed the conversations: take its list, unless this one is mid-answer (its own save follows)
  window.addEventListener("storage", (e) => {
    if (e.key !== store.CONVERSATIONS || controller) return;
    conversations = store.loadConversations();
    current = conversations.find((c) => c.id === current?.id) || null;
    if (current) { renderList(); renderMessages(); } else if (conversations.length) open(conversations[0]); else startNew();
  });
  const hint = $("drop-hint");
  let depth = 0;  // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; hint.hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; hint.hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    hint.hidden = true;
    if (e.dataTransfer?.files?.length) addFiles([...e.dataTransfer.files]);
  });
}

wire();
showSettings();
const saved = conversations.find((c) => c.id === store.currentId());
if (saved) open(saved);
else startNew();
loadModels();
