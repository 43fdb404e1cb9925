/**
 * Reading a server-sent event stream from a fetch Response, with eventsource-parser (the parser the web page uses
 * too): comments skipped, multi-line data joined, an unnamed event named "message". For the `ask` CLI and the tests.
 */
import { EventSourceParserStream } from "eventsource-parser/stream";

export interface SseEvent {
  event: string; // "message" when unnamed
  data: string;
}

/** The events of a response body, as they arrive. */
export async function* sseEvents(res: Response): AsyncGenerator<SseEvent> {
  if (!res.body) return;
  const events = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream());
  for await (const e of events as unknown as AsyncIterable<{ event?: string; data: string }>) {
    yield { event: e.event ?? "message", data: e.data };
  }
}
