/**
 * The recompute prompt around the context: the user's turn carries a placeholder where the gathered
 * context token ids are spliced in, and the rendered template is split there.
 */
import { type ChatMessage, EngineError, type QueryRequest } from "./api.ts";

/** Placeholder rendered in the user's turn where the context token ids are spliced in. */
export const CONTEXT_PLACEHOLDER = "\u2063REFORM_CONTEXT\u2063";

/**
 * Messages for a request. With a context, the last user message (or `question`) becomes
 * CONTEXT_PLACEHOLDER + "\n\n" + question; `previous` is the user turn before it (multi-turn chat), if any.
 */
export function buildMessages(
  req: Pick<QueryRequest, "question" | "messages">,
  withContext: boolean,
): { messages: ChatMessage[]; question: string; previous?: string } {
  const msgs: ChatMessage[] = (req.messages ?? []).map((m) => ({ role: m.role, content: m.content }));
  let question = req.question ?? "";
  if (req.question !== undefined && req.question !== null) {
    msgs.push({ role: "user", content: req.question });
  }
  if (msgs.length === 0)
    throw new EngineError(400, "invalid_request", "either `question` or `messages` is required", "messages");
  if (!withContext) return { messages: msgs, question };
  let last = -1;
  for (let i = msgs.length - 1; i >= 0; i--)
    if (msgs[i]!.role === "user") {
      last = i;
      break;
    }
  if (last < 0)
    throw new EngineError(
      400,
      "invalid_request",
      "a user message (or `question`) is required to query a context",
      "messages",
    );
  question = msgs[last]!.content;
  msgs[last] = { role: "user", content: CONTEXT_PLACEHOLDER + "\n\n" + question };
  let previous: string | undefined;
  for (let i = last - 1; i >= 0 && previous === undefined; i--)
    if (msgs[i]!.role === "user") previous = msgs[i]!.content;
  return previous === undefined ? { messages: msgs, question } : { messages: msgs, question, previous };
}

/** Split a rendered prompt around the context placeholder. */
export function splitAtPlaceholder(rendered: string): { prefix: string; suffix: string } {
  const i = rendered.indexOf(CONTEXT_PLACEHOLDER);
  if (i < 0) throw new EngineError(500, "template_error", "the chat template dropped the user message content");
  if (rendered.indexOf(CONTEXT_PLACEHOLDER, i + 1) >= 0) {
    throw new EngineError(500, "template_error", "the chat template repeats the user message content");
  }
  return { prefix: rendered.slice(0, i), suffix: rendered.slice(i + CONTEXT_PLACEHOLDER.length) };
}
