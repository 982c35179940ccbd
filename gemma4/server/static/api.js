// The server's OpenAI API as the page uses it: the models, and chat completions streamed as server-sent events.

const KEY = "gemma4.apiKey";

export class NeedsKey extends Error {}

export class APIError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set: (key) => (key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY)),
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey.get();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// The error's own words: OpenAI's {"error": {"message"}}, else the status line.
async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || body?.detail || message;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) return new NeedsKey(message);
  return new APIError(response.status, message);
}

// Paths are relative to the page, so that the page also works behind a proxy under a prefix.
export async function listModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw await failure(response);
  return (await response.json()).data;
}

// Yields each event's JSON payload until [DONE]; an event carrying an error throws it, and so does a
// stream that ends without [DONE] (the server went away mid-answer).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new APIError(0, "the connection closed before the answer was complete");
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const payload = JSON.parse(data);
      if (payload.error) throw new APIError(0, payload.error.message || JSON.stringify(payload.error));
      yield payload;
    }
  }
}

// Streams one chat completion: onDelta({content, reasoning}) per chunk; resolves to {finish, usage}.
// Aborting `signal` closes the connection, which is how the server learns to stop generating.
export async function streamChat(body, signal, onDelta) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await failure(response);
  let finish = null, usage = null;
  for await (const chunk of events(response)) {
    if (chunk.usage) usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (!choice) continue;
    const delta = choice.delta || {};
    const reasoning = delta.reasoning_content || delta.reasoning || "";  // ours and vLLM's newer name
    if (delta.content || reasoning) onDelta({ content: delta.content || "", reasoning });
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return { finish, usage };
}
