// The server's own OpenAI API, as any client would call it: GET /v1/models, and
// POST /v1/chat/completions with stream: true, read as server-sent events with fetch and a
// ReadableStream. Every failure becomes an ApiError whose message says, in plain words, what
// happened and what to do.

export class ApiError extends Error {
  // kind: "auth" (a key is needed), "context" (the conversation is too long), "refused" (another
  // 4xx/5xx), "offline" (the server cannot be reached) or "stream" (failed while answering)
  constructor(message, kind) {
    super(message);
    this.kind = kind;
  }
}

const OFFLINE =
  "Cannot reach the server: it may have stopped. Start `llamarun serve` again, then press Regenerate.";

function headers(apiKey) {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function call(path, init) {
  try {
    return await fetch(path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(OFFLINE, "offline");
  }
}

// The error body is OpenAI's {"error": {"message", "type", "param", "code"}}.
async function refusal(response) {
  let message = "";
  try {
    message = (await response.json()).error?.message ?? "";
  } catch {
    // not JSON: a proxy's page, or a server that is not llamarun
  }
  return explain(message, response.status);
}

function explain(message, status) {
  const said = message ? ` The server said: ${message}` : "";
  if (status === 401) {
    return new ApiError(
      "The server needs an API key (it was started with --api-key). Enter the key under Settings, then press Regenerate.",
      "auth",
    );
  }
  if (/context is \d+ tokens|max_seq_len is \d+/.test(message)) {
    return new ApiError(
      `This conversation is too long for the model's context. Start a new chat, shorten the message, or lower Max tokens.${said}`,
      "context",
    );
  }
  const what = status ? `The server refused the request (HTTP ${status}).` : "The server failed while answering.";
  return new ApiError(`${what}${said}`, status ? "refused" : "stream");
}

export async function listModels(apiKey) {
  const response = await call("/v1/models", { headers: headers(apiKey) });
  if (!response.ok) throw await refusal(response);
  return (await response.json()).data.map((m) => m.id);
}

// Streams one answer. onText(piece) gets each piece of text as it arrives; the result is
// {finishReason, usage} (usage: the server's token counts, sent because of include_usage).
// Aborting `signal` ends the request, which the server takes as the client leaving: it cancels
// the answer and frees its slot.
export async function streamChat(body, { apiKey, signal, onText }) {
  const request = { ...body, stream: true, stream_options: { include_usage: true } };
  const response = await call("/v1/chat/completions", {
    method: "POST",
    headers: headers(apiKey),
    body: JSON.stringify(request),
    signal,
  });
  if (!response.ok) throw await refusal(response);
  const result = { finishReason: null, usage: null };
  if (response.headers.get("Content-Type")?.includes("application/json")) {
    return whole(await response.json(), result, onText); // a server that does not stream
  }

  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    return await readStream(reader, result, onText);
  } finally {
    reader.cancel().catch(() => {}); // done with it, whichever way it ended
  }
}

async function readStream(reader, result, onText) {
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(BROKE_OFF, "offline");
    }
    if (chunk.done) {
      // [DONE] should have come first; a finished choice is as good
      if (result.finishReason) return result;
      throw new ApiError(BROKE_OFF, "offline");
    }
    buffer += chunk.value;
    const lines = buffer.split(/\r?\n/);
    buffer = lines.pop(); // an incomplete line waits for the rest
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // blank separators, ": comments", event names
      const data = line.slice(5).trim();
      if (data === "[DONE]") return result;
      readEvent(parse(data), result, onText);
    }
  }
}

const BROKE_OFF =
  "The connection to the server broke off before the answer was finished: the server may have stopped.";

function parse(data) {
  try {
    return JSON.parse(data);
  } catch {
    throw new ApiError(`The server sent something that is not part of an answer: ${data.slice(0, 200)}`, "stream");
  }
}

function readEvent(event, result, onText) {
  // after the 200 status is sent, the server reports an error as an event of its own
  if (event.error) throw explain(event.error.message ?? "", 0);
  if (event.usage) result.usage = event.usage;
  const choice = event.choices?.[0];
  if (!choice) return;
  if (choice.delta?.content) onText(choice.delta.content);
  if (choice.finish_reason) result.finishReason = choice.finish_reason;
}

function whole(completion, result, onText) {
  if (completion.error) throw explain(completion.error.message ?? "", 0);
  const choice = completion.choices?.[0];
  if (choice?.message?.content) onText(choice.message.content);
  result.finishReason = choice?.finish_reason ?? null;
  result.usage = completion.usage ?? null;
  return result;
}
