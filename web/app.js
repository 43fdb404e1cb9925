// The REFORM web page: upload a document as a context (in pieces, resumable, progress from the events stream),
// list the contexts, ask about one with the answer streamed token by token, and show what REFORM gathered (the
// query's opt-in `return_selection`: the passages in document order and the smoothed scores over the whole
// context). Preact + htm render it; eventsource-parser reads the SSE streams (fetch, so the API key can be sent).
import { EventSourceParserStream } from "eventsource-parser/stream";
import htm from "htm";
import { h, render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

const html = htm.bind(h);

// ------------------------------------------------------------------ API access, with the key asked for once

const KEY_STORE = "reform.apiKey";
let apiKey = localStorage.getItem(KEY_STORE) ?? "";
let keyWait = null; // {promise, resolve} while the key dialog is open
let showKeyDialog = () => {};

function askKey(why) {
  if (!keyWait) {
    let resolve;
    const promise = new Promise((r) => (resolve = r));
    keyWait = { promise, resolve };
    showKeyDialog(why);
  }
  return keyWait.promise;
}

/** What an `Authorization: Bearer` header can carry: printable ASCII without spaces (RFC 6750's token68 and more). */
const SENDABLE_KEY = /^[\x21-\x7e]+$/;

function setKey(key) {
  apiKey = key;
  localStorage.setItem(KEY_STORE, key);
  const w = keyWait;
  keyWait = null;
  showKeyDialog(null);
  w?.resolve();
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code ?? null;
  }
}

/** fetch with the API key; a 401 opens the key dialog and the request is sent again with the new key. */
async function api(path, init = {}) {
  for (;;) {
    if (apiKey && !SENDABLE_KEY.test(apiKey)) {
      await askKey("The stored key has characters a request header cannot carry.");
      continue;
    }
    const headers = new Headers(init.headers);
    if (apiKey) headers.set("authorization", `Bearer ${apiKey}`);
    let res;
    try {
      res = await fetch(path, { ...init, headers });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      // the browser's own words ("Failed to fetch", "Load failed") do not say what happened
      throw new Error(`Cannot reach the server (${e.message}): is it running? The page retries on its own.`);
    }
    if (res.status !== 401) return res;
    const err = await errorOf(res);
    await askKey(apiKey ? `The server refused the key: ${err.message}.` : "This server needs an API key.");
  }
}

async function errorOf(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    /* not JSON */
  }
  return new ApiError(res.status, body);
}

async function apiJson(path, init) {
  const res = await api(path, init);
  if (!res.ok) throw await errorOf(res);
  return res.json();
}

const postJson = (path, body, signal) =>
  api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal });

/**
 * Server-sent events of a response, as {event, data} (comments and keep-alives dropped by the parser). Read with a
 * reader rather than `for await` over the stream, which not every browser supports; leaving the loop early cancels
 * the stream, which closes the connection.
 */
async function* sseOf(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      yield value;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    const stop = () => {
      clearTimeout(t);
      resolve();
    };
    signal?.addEventListener("abort", stop, { once: true });
  });

// ------------------------------------------------------------------ formatting

const nf = new Intl.NumberFormat("en");
const num = (n) => (n == null ? "–" : nf.format(Math.round(n)));
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (; n >= 1024 && i < u.length - 1; i++) n /= 1024;
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${u[i]}`;
}
function duration(s) {
  if (s == null || !Number.isFinite(s)) return "–";
  if (s < 60) return `${Math.ceil(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
const nameOf = (c) => c.metadata?.name ?? c.id;

// ------------------------------------------------------------------ upload: pieces with ?offset=, resumed on failure

/** Pieces start at 256 KiB and then aim at PIECE_MS each; `?piece=N` in the page's URL fixes them at N bytes. */
const FIXED_PIECE = Number(new URLSearchParams(location.search).get("piece")) || 0;
const INITIAL_PIECE = FIXED_PIECE || 256 * 1024;
const PIECE_MS = 5000;
const MAX_PIECE = 32 << 20;
const MAX_RETRIES = 8;

/**
 * A file as the UTF-8 text the server stores: a gzip file decompressed, UTF-16 (with its byte-order mark) converted.
 * Done here, not by the server, so that the byte offsets the server counts are this blob's own and a cut upload
 * resumes at the right byte (the server refuses to resume a body it converts).
 */
async function asText(blob) {
  const head = async (b) => new Uint8Array(await b.slice(0, 2).arrayBuffer());
  let h = await head(blob);
  if (h[0] === 0x1f && h[1] === 0x8b) {
    try {
      blob = await new Response(blob.stream().pipeThrough(new DecompressionStream("gzip"))).blob();
    } catch (e) {
      throw new Error(`the file starts like gzip but does not decompress (${e.message})`);
    }
    h = await head(blob);
  }
  const utf16 = h[0] === 0xff && h[1] === 0xfe ? "utf-16le" : h[0] === 0xfe && h[1] === 0xff ? "utf-16be" : null;
  if (utf16) blob = new Blob([new TextDecoder(utf16).decode(await blob.arrayBuffer())], { type: "text/plain" });
  return blob;
}

/**
 * Appends blob[from..] to context `id` piece by piece (PUT ?offset=, the last with final=true). After a dropped
 * connection or a 5xx / busy answer it waits, reads `bytes_received` again and goes on from there, so no byte is sent
 * twice or skipped; other errors (413 quota, 404, …) end the upload. `report({sent, retry})` follows it.
 */
async function uploadBlob(id, blob, from, report, signal) {
  let off = from;
  let piece = INITIAL_PIECE;
  let failures = 0;
  for (;;) {
    const end = Math.min(blob.size, off + piece);
    const final = end >= blob.size;
    const t0 = performance.now();
    let failure;
    try {
      const res = await api(`/v1/contexts/${id}/content?offset=${off}${final ? "&final=true" : ""}`, {
        method: "PUT",
        headers: { "content-type": "text/plain; charset=utf-8" },
        body: blob.slice(off, end),
        signal,
      });
      if (res.ok) {
        const info = await res.json();
        off = info.bytes_received;
        failures = 0;
        report({ sent: off, info, retry: null });
        if (final) return info;
        const ms = Math.max(1, performance.now() - t0);
        if (!FIXED_PIECE)
          piece = Math.round(Math.min(MAX_PIECE, Math.max(16 << 10, piece * Math.min(2, PIECE_MS / ms))));
        continue;
      }
      failure = await errorOf(res);
      const retryable = res.status >= 500 || failure.code === "context_busy" || failure.code === "offset_mismatch";
      if (!retryable) throw failure;
    } catch (e) {
      if (signal.aborted || e instanceof ApiError) throw e;
      failure = e; // the connection dropped
    }
    // whatever reached the server is kept: go on from what it has stored, once it answers again
    for (;;) {
      if (++failures > MAX_RETRIES) throw failure;
      report({ retry: `${failure.message}; resuming (try ${failures} of ${MAX_RETRIES})` });
      await sleep(Math.min(8000, 250 * 2 ** failures), signal);
      if (signal.aborted) throw failure;
      try {
        off = (await apiJson(`/v1/contexts/${id}`, { signal })).bytes_received;
        break;
      } catch (e) {
        if (signal.aborted || (e instanceof ApiError && e.status < 500)) throw e;
        failure = e;
      }
    }
    report({ sent: off });
  }
}

/**
 * Follows a context's events stream (reconnecting after a drop) until `stop()` says so; each event's context object
 * goes to `onInfo`.
 */
async function watchEvents(id, onInfo, stop, signal) {
  while (!signal.aborted) {
    try {
      const res = await api(`/v1/contexts/${id}/events?follow=true`, { signal });
      if (!res.ok) throw await errorOf(res);
      for await (const ev of sseOf(res)) {
        if (ev.data === "[DONE]") break;
        // the context was deleted meanwhile (elsewhere, or by the server): nothing more will come
        if (ev.event === "error") return;
        const info = JSON.parse(ev.data);
        onInfo(info);
        if (stop(info)) return;
      }
    } catch (e) {
      if (signal.aborted || (e instanceof ApiError && e.status === 404)) return;
    }
    await sleep(1000, signal);
  }
}

/** tokens/s over the last few seconds of progress events, and the ETA of the whole document from it */
function progressRate(samples, info, totalBytes) {
  const now = performance.now();
  samples.push([now, info.tokens_processed]);
  while (samples.length > 2 && now - samples[0][0] > 5000) samples.shift();
  const [t0, p0] = samples[0];
  const rate = now > t0 + 200 ? ((info.tokens_processed - p0) * 1000) / (now - t0) : null;
  const perByte = info.bytes_received > 0 ? info.tokens_received / info.bytes_received : null;
  const estTokens = perByte != null ? Math.max(info.tokens_received, perByte * totalBytes) : null;
  const eta = rate > 0 && estTokens != null ? Math.max(0, estTokens - info.tokens_processed) / rate : null;
  return { rate, estTokens, eta };
}

// ------------------------------------------------------------------ components

/** Enter or Space on a focused row or band does what a click does (keyboard use of the list and the chart). */
function onActivate(e, act) {
  if (e.target !== e.currentTarget || (e.key !== "Enter" && e.key !== " ")) return;
  e.preventDefault();
  act();
}

function KeyDialog({ why }) {
  const [key, setK] = useState("");
  const [bad, setBad] = useState(null);
  return html`<div class="modal">
    <form
      class="card"
      onSubmit=${(e) => {
        e.preventDefault();
        const k = key.trim();
        if (!k) return;
        if (SENDABLE_KEY.test(k)) setKey(k);
        else setBad("An API key is printable ASCII without spaces: this one cannot be sent in a request header.");
      }}
    >
      <h2>API key</h2>
      <p>${why} It is kept in this browser (local storage) and sent as <code>Authorization: Bearer …</code>.</p>
      <input id="api-key" type="password" autocomplete="off" value=${key} onInput=${(e) => {
        setK(e.target.value);
        setBad(null);
      }} />
      ${bad && html`<div class="error key-error">${bad}</div>`}
      <button type="submit">Use this key</button>
    </form>
  </div>`;
}

function UploadForm({ onStart }) {
  const [file, setFile] = useState(null);
  const [text, setText] = useState("");
  const [name, setName] = useState("");
  const [problem, setProblem] = useState(null);
  const fileInput = useRef(null);
  const go = (e) => {
    e.preventDefault();
    const blob = file ?? (text ? new Blob([text], { type: "text/plain" }) : null);
    if (!blob) return;
    if (blob.size === 0) {
      setProblem(`"${file?.name ?? "the text"}" is empty: there is nothing to compress or ask about.`);
      return;
    }
    setProblem(null);
    // cleared once the context exists (a failed start keeps what was typed), so a second click cannot send it twice
    onStart(blob, name.trim() || file?.name || "pasted text", () => {
      setText("");
      setName("");
      setFile(null);
      if (fileInput.current) fileInput.current.value = "";
    });
  };
  return html`<form class="card upload-form" onSubmit=${go}>
    <h2>New context</h2>
    <label>File <input id="file" type="file" ref=${fileInput} onChange=${(e) => {
      setFile(e.target.files[0] ?? null);
      setProblem(null);
    }} /></label>
    <label
      >or paste text
      <textarea id="paste" rows="4" value=${text} onInput=${(e) => setText(e.target.value)} disabled=${!!file}></textarea>
    </label>
    <label>Name <input id="ctx-name" value=${name} placeholder=${file?.name ?? "optional"} onInput=${(e) => setName(e.target.value)} /></label>
    ${problem && html`<div class="error upload-problem">${problem}</div>`}
    <button id="upload" type="submit" disabled=${!file && !text}>Upload and compress</button>
  </form>`;
}

function UploadProgress({ u, onClose }) {
  const info = u.info;
  const state = u.error ? "failed" : (info?.state ?? "starting");
  const over = state === "ready" || state === "failed";
  const sentPct = u.total ? (100 * u.sent) / u.total : 100;
  const donePct = info && u.estTokens ? Math.min(100, (100 * info.tokens_processed) / u.estTokens) : 0;
  return html`<div class="card upload" data-upload-state=${state} data-context=${u.id}>
    <div class="row">
      <strong>${u.name}</strong>
      <span class=${`state state-${state}`}>${state}</span>
      ${over && html`<button type="button" class="link close" title="close" aria-label="close" onClick=${onClose}>×</button>`}
    </div>
    <div class="bar" title="uploaded / compressed">
      <div class="bar-sent" style=${`width:${sentPct}%`}></div>
      <div class="bar-done" style=${`width:${state === "ready" ? 100 : donePct}%`}></div>
    </div>
    <div class="stats">
      <span>${bytes(u.sent)} of ${bytes(u.total)} sent</span>
      <span>${num(info?.tokens_processed)} tokens compressed${u.estTokens ? ` of ~${num(u.estTokens)}` : ""}</span>
      <span>${u.rate != null ? `${num(u.rate)} tok/s` : ""}</span>
      <span>${state === "ready" ? "done" : u.eta != null ? `ETA ${duration(u.eta)}` : ""}</span>
    </div>
    ${u.retry && !u.error && html`<div class="note">${u.retry}</div>`}
    ${u.error && html`<div class="error">${u.error}</div>`}
  </div>`;
}

function ContextList({ contexts, loading, selected, uploading, onSelect, onDelete, onResume }) {
  if (loading) return html`<p class="muted loading">Loading contexts…</p>`;
  if (!contexts.length) return html`<p class="muted">No contexts yet: upload a document.</p>`;
  return html`<div class="table-wrap"><table class="contexts">
    <thead>
      <tr><th>Name</th><th>State</th><th>Text</th><th>Tokens</th><th>On disk</th><th></th></tr>
    </thead>
    <tbody>
      ${contexts.map((c) => {
        const size = c.metadata?.size;
        // an upload in progress from another tab or client is not one to resume here
        const elsewhere = c.upload_in_progress && !uploading.has(c.id);
        const resumable =
          c.state !== "ready" && !uploading.has(c.id) && !elsewhere && size != null && c.bytes_received <= size;
        return html`<tr
          key=${c.id}
          class=${`ctx-row${c.id === selected ? " selected" : ""}`}
          data-id=${c.id}
          data-state=${c.state}
          tabindex="0"
          aria-selected=${c.id === selected ? "true" : "false"}
          onClick=${() => onSelect(c.id)}
          onKeyDown=${(e) => onActivate(e, () => onSelect(c.id))}
        >
          <td title=${c.id}>${nameOf(c)}</td>
          <td><span class=${`state state-${c.state}`}>${c.state}</span></td>
          <td>${bytes(c.bytes_received)}${size != null && size !== c.bytes_received ? ` of ${bytes(size)}` : ""}</td>
          <td>${num(c.tokens_processed)}</td>
          <td>${bytes(c.disk_bytes)}</td>
          <td class="actions" onClick=${(e) => e.stopPropagation()}>
            ${resumable && html`<button class="resume" onClick=${() => onResume(c)}>Resume…</button>`}
            ${elsewhere && html`<span class="muted uploading-elsewhere" title="an upload from another tab or client is running">uploading…</span>`}
            <button class="delete" onClick=${() => onDelete(c)}>Delete</button>
          </td>
        </tr>`;
      })}
    </tbody>
  </table></div>`;
}

/** The strip chart: smoothed scores over the whole context (max per bucket) and the gathered spans on top. */
function StripChart({ sel, best, onPick }) {
  const W = 1000;
  const H = 60;
  const n = sel.context_tokens || 1;
  const p = sel.profile;
  const span = p ? p.max - p.min || 1 : 1;
  const bw = p ? W / p.buckets : 0;
  return html`<svg class="strip" viewBox=${`0 0 ${W} ${H}`} preserveAspectRatio="none" role="img"
    aria-label="smoothed scores over the context, gathered passages highlighted">
    ${sel.spans.map(
      (
        s,
        i,
      ) => html`<rect class=${i === best ? "band best" : "band"} x=${(s.start / n) * W} y="0" width=${Math.max(2, ((s.end - s.start) / n) * W)}
        height=${H} tabindex="0" role="button" onClick=${() => onPick(i)} onKeyDown=${(e) => onActivate(e, () => onPick(i))}><title>${`passage ${i + 1}: tokens ${s.start}–${s.end}`}</title></rect>`,
    )}
    ${p?.values.map((v, i) => {
      const y = H - 2 - ((v - p.min) / span) * (H - 6);
      return html`<rect class="score" x=${i * bw} y=${y} width=${Math.max(bw, 1)} height=${H - y} />`;
    })}
  </svg>`;
}

function SelectionView({ sel }) {
  const list = useRef(null);
  if (sel.method === "streaming" || sel.method === "h2o")
    return html`<section class="selection">
      <h3>${`${sel.method}: the whole context compressed again into a cache of ${num(sel.selected_tokens)} tokens`}</h3>
      <p class="muted">
        ${
          sel.method === "streaming"
            ? "StreamingLLM keeps the first tokens (attention sinks) and the most recent ones; "
            : "H2O keeps the first tokens, the most recent ones and those that drew the most attention; "
        }
        no passages are gathered, so there is nothing to show in the document.
      </p>
    </section>`;
  const n = sel.context_tokens || 1;
  const best = sel.spans.reduce((b, s, i) => (s.score != null && (b < 0 || s.score > sel.spans[b].score) ? i : b), -1);
  const pick = (i) => list.current?.children[i]?.scrollIntoView({ behavior: "smooth", block: "nearest" });
  let prev = 0;
  return html`<section class="selection">
    <h3>
      ${`What REFORM gathered: ${num(sel.selected_tokens)} of ${num(sel.context_tokens)} tokens in ${sel.spans.length} `}
      ${`passage${sel.spans.length === 1 ? "" : "s"} (${sel.method})`}
    </h3>
    <${StripChart} sel=${sel} best=${best} onPick=${pick} />
    <div class="axis"><span>start</span><span>smoothed score per position; highlighted: gathered</span><span>end</span></div>
    <ol class="passages" ref=${list}>
      ${sel.spans.map((s, i) => {
        const skipped = s.start - prev;
        prev = s.end;
        return html`<li class=${`passage${i === best ? " best" : ""}`} data-start=${s.start} data-end=${s.end}>
          <header>
            ${skipped > 0 && html`<span class="gap">… ${num(skipped)} tokens skipped …</span>`}
            <span>tokens ${num(s.start)}–${num(s.end)}</span>
            <span>chars ${num(s.char_start)}–${num(s.char_end)} (bytes ${num(s.byte_start)}–${num(s.byte_end)})</span>
            <span>at ${Math.round((100 * s.start) / n)} %</span>
            ${s.score != null && html`<span>score ${s.score.toFixed(3)}</span>`}
            ${i === best && html`<strong>best</strong>`}
          </header>
          <mark>${s.text}</mark>
        </li>`;
      })}
    </ol>
  </section>`;
}

function Turn({ t }) {
  return html`<div class="turn">
    <div class="q"><span class="who">you</span> ${t.q}</div>
    <div class="a">
      <span class="who">reform</span>
      <span class="answer" data-done=${t.done ? "true" : "false"} data-tokens=${t.tokens}>${t.a}</span>
      ${!t.done && html`<span class="caret">▍</span>`}
      ${t.progress && !t.done && html`<span class="muted"> ${t.progress}</span>`}
    </div>
    ${t.error && html`<div class="error">${t.error}</div>`}
    ${
      t.finish &&
      html`<div class="muted usage">
        ${`${t.finish.finish_reason} · ${t.finish.usage.completion_tokens} tokens · first token `}
        ${`${Math.round(t.finish.timings.ttft_ms)} ms · ${t.finish.usage.prompt_tokens} prompt tokens`}
      </div>`
    }
    ${t.selection && html`<${SelectionView} sel=${t.selection} />`}
  </div>`;
}

function AskPanel({ ctx, props }) {
  const limits = props?.limits ?? {};
  const [turns, setTurns] = useState([]);
  const [question, setQuestion] = useState("");
  const [method, setMethod] = useState("reform");
  const [budget, setBudget] = useState(limits.budget ?? 320);
  const [maxTokens, setMaxTokens] = useState(limits.max_tokens ?? 64);
  const [chat, setChat] = useState(false);
  const abort = useRef(null);
  useEffect(() => {
    setTurns([]);
    abort.current?.abort();
  }, [ctx.id]);
  useEffect(() => {
    if (limits.budget) setBudget(limits.budget);
    if (limits.max_tokens) setMaxTokens(limits.max_tokens);
  }, [limits.budget, limits.max_tokens]);
  const busy = turns.some((t) => !t.done);
  const empty = ctx.state === "ready" && ctx.tokens_received === 0;
  const ready = ctx.state === "ready" && !empty;
  // one question at a time, also when two submits land before a render (busy above is a render behind)
  const asking = useRef(false);

  const ask = async (e) => {
    e.preventDefault();
    const q = question.trim();
    if (!q || busy || !ready || asking.current) return;
    asking.current = true;
    const history = chat
      ? turns
          .filter((t) => !t.error)
          .flatMap((t) => [
            { role: "user", content: t.q },
            { role: "assistant", content: t.a },
          ])
      : [];
    const idx = turns.length;
    const update = (f) => setTurns((ts) => ts.map((t, i) => (i === idx ? { ...t, ...f(t) } : t)));
    setTurns((ts) => [...ts, { q, a: "", tokens: 0, done: false }]);
    setQuestion("");
    const ac = new AbortController();
    abort.current = ac;
    try {
      const res = await postJson(
        `/v1/contexts/${ctx.id}/query`,
        {
          messages: [...history, { role: "user", content: q }],
          method,
          budget: Number(budget),
          max_tokens: Number(maxTokens),
          stream: true,
          return_selection: true,
        },
        ac.signal,
      );
      if (!res.ok) throw await errorOf(res);
      for await (const ev of sseOf(res)) {
        if (ev.data === "[DONE]") break;
        const d = JSON.parse(ev.data);
        if (ev.event === "start") update(() => ({ selection: d.selection, progress: null }));
        else if (ev.event === "progress") update(() => ({ progress: `${d.stage}: ${num(d.done)} / ${num(d.total)}` }));
        else if (ev.event === "token") update((t) => ({ a: t.a + d.text, tokens: t.tokens + 1 }));
        else if (ev.event === "finish") update(() => ({ finish: d }));
        else if (ev.event === "error") throw new ApiError(0, d);
      }
    } catch (err) {
      if (!ac.signal.aborted) update(() => ({ error: err.message }));
    } finally {
      asking.current = false;
      update(() => ({ done: true }));
    }
  };

  return html`<section class="card ask">
    <div class="row">
      <h2>Ask “${nameOf(ctx)}”</h2>
      ${turns.length > 0 && html`<button class="link" onClick=${() => setTurns([])} disabled=${busy}>new conversation</button>`}
    </div>
    ${
      empty
        ? html`<p class="muted">This context is empty: upload text into it to ask about it.</p>`
        : !ready && html`<p class="muted">This context is ${ctx.state}; questions are answered once it is ready.</p>`
    }
    <div class="turns">${turns.map((t, i) => html`<${Turn} key=${i} t=${t} />`)}</div>
    <form class="ask-form" onSubmit=${ask}>
      <textarea
        id="question"
        rows="2"
        placeholder="Ask a question about the document"
        value=${question}
        onInput=${(e) => setQuestion(e.target.value)}
        onKeyDown=${(e) => {
          if (e.key !== "Enter" || e.shiftKey) return;
          e.preventDefault();
          e.currentTarget.form.requestSubmit();
        }}
      ></textarea>
      <div class="row options">
        <label>Method
          <select id="method" value=${method} onChange=${(e) => setMethod(e.target.value)}>
            <option value="reform">reform (gather)</option>
            <option value="full">full context</option>
            <option value="streaming">streaming (StreamingLLM)</option>
            <option value="h2o">h2o</option>
          </select>
        </label>
        <label>Budget <input id="budget" type="number" min="16" max=${limits.max_budget} value=${budget}
          onInput=${(e) => setBudget(e.target.value)} /></label>
        <label>Max tokens <input id="max-tokens" type="number" min="1" max=${limits.max_new_tokens} value=${maxTokens}
          onInput=${(e) => setMaxTokens(e.target.value)} /></label>
        <label title="send the earlier questions and answers along (they take room in the window)">
          <input type="checkbox" checked=${chat} onChange=${(e) => setChat(e.target.checked)} /> chat
        </label>
        ${
          busy
            ? html`<button type="button" id="stop" onClick=${() => abort.current?.abort()}>Stop</button>`
            : html`<button id="ask" type="submit" disabled=${!ready || !question.trim()}>Ask</button>`
        }
      </div>
    </form>
  </section>`;
}

function App() {
  const [keyWhy, setKeyWhy] = useState(null);
  const [props, setProps] = useState(null);
  const [contexts, setContexts] = useState(null); // null until the first list arrives
  const [selected, setSelected] = useState(null);
  const [uploads, setUploads] = useState({}); // context id -> upload state
  const [error, setError] = useState(null);
  showKeyDialog = setKeyWhy;

  const refresh = async () => {
    try {
      const list = await apiJson("/v1/contexts");
      setContexts(list.data.sort((a, b) => b.created_at - a.created_at));
      setError(null);
    } catch (e) {
      setError(e.message);
    }
  };
  useEffect(() => {
    apiJson("/props")
      .then(setProps)
      .catch((e) => setError(e.message));
    refresh();
    const t = setInterval(refresh, 4000);
    return () => clearInterval(t);
  }, []);

  const setUpload = (id, f) => setUploads((us) => ({ ...us, [id]: { ...us[id], ...f(us[id] ?? {}) } }));
  const dropUpload = (id) => setUploads(({ [id]: _, ...rest }) => rest);

  /** Uploads blob[from..] into context `id`, with the events stream's progress next to it. */
  const runUpload = async (id, name, blob, from) => {
    const ac = new AbortController();
    const samples = [];
    let sent = false;
    let lastState = null;
    setUpload(id, () => ({ id, name, total: blob.size, sent: from, info: null, error: null, retry: null }));
    setSelected(id);
    const onInfo = (info) => {
      const r = progressRate(samples, info, blob.size);
      setUpload(id, (u) => ({
        info,
        ...r,
        rate: r.rate ?? u.rate,
        eta: r.eta ?? u.eta,
        sent: Math.max(u.sent ?? 0, info.bytes_received ?? 0),
      }));
      if (info.state !== lastState) refresh(); // the list shows the new state at once
      lastState = info.state;
    };
    const events = watchEvents(
      id,
      onInfo,
      (info) => info.state === "failed" || (sent && info.state === "ready"),
      ac.signal,
    );
    try {
      const info = await uploadBlob(id, blob, from, (r) => setUpload(id, () => r), ac.signal);
      sent = true;
      onInfo(info);
      if (info.state === "ready" || info.state === "failed") ac.abort();
    } catch (e) {
      setUpload(id, () => ({ error: e.message }));
      ac.abort();
    }
    await events;
    refresh();
  };

  const start = async (file, name, created) => {
    try {
      const blob = await asText(file);
      const ctx = await postJson("/v1/contexts", { metadata: { name, size: blob.size, source: "web" } }).then(
        async (res) => (res.ok ? res.json() : Promise.reject(await errorOf(res))),
      );
      created();
      await refresh();
      await runUpload(ctx.id, name, blob, 0);
    } catch (e) {
      setError(e.message);
    }
  };

  const resume = (c) => {
    const input = document.createElement("input");
    input.type = "file";
    input.onchange = async () => {
      if (!input.files[0]) return;
      let f;
      try {
        f = await asText(input.files[0]);
      } catch (e) {
        setError(e.message);
        return;
      }
      if (f.size !== c.metadata.size) {
        setError(
          `"${input.files[0].name}" has ${bytes(f.size)} of text; the upload of "${nameOf(c)}" was ${bytes(c.metadata.size)}`,
        );
        return;
      }
      const info = await apiJson(`/v1/contexts/${c.id}`);
      runUpload(c.id, nameOf(c), f, info.bytes_received);
    };
    input.click();
  };

  const remove = async (c) => {
    if (!confirm(`Delete "${nameOf(c)}" and its files?`)) return;
    try {
      await apiJson(`/v1/contexts/${c.id}`, { method: "DELETE" });
      if (selected === c.id) setSelected(null);
      dropUpload(c.id);
    } catch (e) {
      setError(e.message);
    }
    refresh();
  };

  const live = (c) => {
    const info = uploads[c.id]?.info;
    return info && info.updated_at >= c.updated_at ? { ...c, ...info } : c;
  };
  const rows = (contexts ?? []).map(live);
  const current = rows.find((c) => c.id === selected);
  const uploading = new Set(
    Object.values(uploads)
      .filter((u) => !u.error && u.info?.state !== "ready")
      .map((u) => u.id),
  );
  const diskTotal = rows.reduce((s, c) => s + (c.disk_bytes ?? 0), 0);

  return html`<header class="top">
      <h1>REFORM</h1>
      <span class="muted">
        ${props ? `${props.model} · ${props.backend} · window ${num(props.limits.trained_window)} tokens · budget ${num(props.limits.budget)}` : "connecting…"}
      </span>
      <span class="muted">compress · gather · recompute</span>
    </header>
    ${error && html`<div class="error banner" onClick=${() => setError(null)}>${error}</div>`}
    <main>
      <div class="left">
        <${UploadForm} onStart=${start} />
        ${Object.values(uploads)
          .reverse()
          .map((u) => html`<${UploadProgress} key=${u.id} u=${u} onClose=${() => dropUpload(u.id)} />`)}
        <section class="card">
          <div class="row"><h2>Contexts</h2><span class="muted">${contexts ? `${bytes(diskTotal)} on disk` : ""}</span></div>
          <${ContextList}
            contexts=${rows}
            loading=${contexts === null}
            selected=${selected}
            uploading=${uploading}
            onSelect=${setSelected}
            onDelete=${remove}
            onResume=${resume}
          />
        </section>
      </div>
      <div class="right">
        ${current ? html`<${AskPanel} ctx=${current} props=${props} />` : html`<p class="muted card">Select or upload a context to ask about it.</p>`}
      </div>
    </main>
    ${keyWhy && html`<${KeyDialog} why=${keyWhy} />`}`;
}

render(html`<${App} />`, document.getElementById("app"));
