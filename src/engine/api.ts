/**
 * The contract between the HTTP layer (routes/) and the engine (src/engine/).
 *
 * The HTTP thread only ever talks to an `EngineClient`; the implementation forwards work to the
 * engine worker (a Bun Worker that owns the native library) so the HTTP thread never blocks.
 */
import type { SamplingDefaults } from "../model/generation-config.ts";
import type { ScoreBackground } from "./background.ts";

export type Method = "reform" | "full" | "streaming" | "h2o";
export const METHODS: readonly Method[] = ["reform", "full", "streaming", "h2o"] as const;

export type ContextState =
  | "empty" // created, no content yet
  | "processing" // content received and not yet fully compressed
  | "ready" // everything received so far is compressed; queries allowed
  | "failed"; // processing failed; `error` says why (the session's data stays on disk)

export interface ContextInfo {
  id: string;
  state: ContextState;
  createdAt: number; // ms since epoch
  updatedAt: number;
  bytesReceived: number; // UTF-8 bytes of content accepted so far
  tokensReceived: number; // tokens written to the token file (tokenized, maybe not compressed yet)
  tokensProcessed: number; // tokens whose embeddings are on disk (compressed)
  pendingChars: number; // characters held in the tokenizer tail buffer (flushed by finalize/query)
  embeddingBytes: number; // size of the embedding file
  diskBytes: number; // size of all its files (tokens, embeddings, compressor state, metadata)
  cacheLen: number; // current compressed KV entries per layer/head
  invalidUtf8: number; // invalid UTF-8 sequences in the content, each read as U+FFFD (then spans' byte offsets are the stored text's, not the file's)
  metadata?: Record<string, unknown>;
  error?: string;
}

export interface ChatMessage {
  role: "system" | "user" | "assistant" | "tool";
  content: string;
}

export interface SamplingOptions {
  maxTokens: number; // new tokens to generate
  temperature: number; // 0 = greedy
  topP: number;
  topK: number; // 0 = off
  /** min-p sampling: tokens less likely than min_p × the most likely one (after temperature) are dropped; 0 = off */
  minP?: number;
  seed?: number;
  stop: string[]; // stop strings (not included in the output)
  /** Report log-probabilities: the sampled token's and the `logprobs` most likely alternatives (0..20).
   * Of the model's own distribution (before temperature, penalties and bias). Omitted / null: off. */
  logprobs?: number | null;
  /** OpenAI semantics over the tokens generated so far: logit -= presence * [count > 0] + frequency * count. */
  presencePenalty?: number;
  frequencyPenalty?: number;
  /** HF / vLLM semantics over prompt + generated tokens: logit / p when positive, logit * p otherwise (1 = off). */
  repetitionPenalty?: number;
  /** token id -> value added to its logit (-100..100; -100 effectively bans the token) */
  logitBias?: Record<number, number>;
}

export interface TokenLogprob {
  tokenId: number;
  token: string; // the token's own text (U+FFFD for a partial UTF-8 sequence)
  bytes: number[]; // the bytes it stands for
  logprob: number;
}

export interface QueryRequest {
  /** Context session to answer from; omitted = plain chat over the messages (no long context). */
  contextId?: string;
  /** Either a question (wrapped into a user turn after the context) or chat messages. */
  question?: string;
  messages?: ChatMessage[];
  /** Or a raw prompt: no chat template; with a context, the context's tokens come first and the prompt continues
   * them (put any separator into the prompt). BOS is added when the model uses one. */
  prompt?: string;
  sampling: SamplingOptions;
  method: Method;
  /** Recompute budget in context tokens (gathered tokens); default from server config. */
  budget?: number;
  /** The score floor for this query (selection.ts keepNearBest: 0 fills the budget by score); default from server
   * config. */
  scoreFloor?: number;
  /** Which background each question token's scores count from (background.ts: "kth-pairs", "kth", "mean" or "off"); default
   * from server config. */
  scoreBackground?: ScoreBackground;
  /**
   * Inline REFORM (no contextId): when the rendered prompt does not fit the window, everything but its end is
   * compressed into an implicit context (cached per owner, keyed by its tokens) and the end is the question;
   * a prompt that fits is answered as usual. `owner` keeps the implicit contexts of different API keys apart.
   */
  inline?: { owner: string };
  /** Report what was gathered (the `start` event's `selection`): off by default, so the hot path is unchanged. */
  returnSelection?: boolean;
  signal?: AbortSignal;
}

/** A run of consecutive gathered context tokens, [start, end), with its text and its place in the document. */
export interface SelectedSpan {
  start: number;
  end: number;
  /** UTF-8 bytes and Unicode code points of the text as the server decoded it (the tokens' bytes, see gather.ts) */
  byteStart: number;
  byteEnd: number;
  charStart: number;
  charEnd: number;
  /** highest smoothed score inside the span (null when the method scored nothing) */
  score: number | null;
  text: string;
}

/** What a query gathered from its context (opt-in: `returnSelection`). */
export interface Selection {
  method: Method;
  contextTokens: number;
  selectedTokens: number;
  /** smoothing window, its lag and the always-kept edge (each side) used for this budget; 0 when nothing was scored */
  window: number;
  lag: number;
  edge: number;
  /** the score floor this query gathered with (selection.ts keepNearBest); 0 when nothing was scored */
  scoreFloor: number;
  /** the background the question tokens' scores counted from (background.ts); "off" when nothing was scored */
  scoreBackground: ScoreBackground;
  /** selected tokens merged into runs, in document order */
  spans: SelectedSpan[];
  /**
   * The smoothed scores over the whole context, downsampled: `values[i]` is the highest smoothed score of the
   * tokens [floor(i*n/B), floor((i+1)*n/B)) for B = values.length (min(n, 512)). Null when the method scores
   * nothing (full, streaming, h2o).
   */
  profile: { buckets: number; values: number[]; min: number; max: number } | null;
}

export interface Usage {
  promptTokens: number; // tokens the model actually attended to in the recompute (gathered + template + query)
  completionTokens: number;
  contextTokens: number; // total tokens of the context session
  selectedTokens: number; // context tokens gathered for recompute
}

export type FinishReason = "stop" | "length" | "abort";

/** How an inline request found its implicit context (see InlineInfo). */
export type InlineCache = "hit" | "extend" | "miss" | "shared";

/** What an inline request was answered from: the first event of such a query, before any compression. */
export interface InlineInfo {
  contextId: string;
  /** hit: compressed already; extend: a cached prefix got the new tokens appended; miss: compressed from scratch;
   * shared: joined a compression of the same tokens already in flight */
  cache: InlineCache;
  /** tokens of the compressed part (the implicit context) */
  contextTokens: number;
  /** tokens this request compresses (0 on a hit) */
  appendedTokens: number;
  /** context tokens the recompute may gather (min(budget, contextTokens) for reform; the score floor may gather
   * fewer) */
  gatheredTokens: number;
  /** tokens of the question as the recompute has it (the end of the prompt) */
  questionTokens: number;
  /** prefix hash (sha-256 over the owner and the compressed token ids, hex) */
  key: string;
}

export type QueryEvent =
  | ({ type: "inline" } & InlineInfo)
  | {
      type: "start";
      promptTokens: number;
      selectedTokens: number;
      contextTokens: number;
      /** only when the request asked for it (`returnSelection`) and it has a context */
      selection?: Selection;
    }
  /** long query-time work before the first token: the recurrent baselines' full-depth pass, or compressing an
   * inline request's prompt (`compress`): `done` of `total` tokens */
  | { type: "progress"; stage: "h2o" | "streaming" | "compress"; done: number; total: number }
  | {
      type: "token";
      text: string; // stable text to emit now (may be "" while a character or stop string is incomplete)
      tokenId: number; // -1 for the final flush of held-back text
      logprob?: TokenLogprob & { top: TokenLogprob[] }; // when sampling.logprobs is set
    }
  | {
      type: "done";
      finishReason: FinishReason;
      usage: Usage;
      timings: { queueMs: number; ttftMs: number; tpotMs: number; totalMs: number };
    };

/** The memory plan printed at start and shown in /health (bytes; device figures null on the CPU backend). */
export interface MemoryPlan {
  weights: number;
  /** per-step scratch shared by all compressors and sequences (one step runs at a time) */
  workspace: number;
  /** cache of one live upload compressor */
  perCompressor: number;
  /** KV cache of one recompute sequence of maxModelLen tokens */
  recomputeSeq: number;
  maxModelLen: number;
  deviceFree: number | null;
  deviceTotal: number | null;
  /** live compressors the plan allows (bounded by --max-live-compressors) */
  maxLiveCompressors: number;
  /** device memory for resident context embeddings (resident.ts): what is left after the above, or
   * --resident-emb-bytes; 0 on the CPU backend */
  residentBudget: number;
  /** context tokens that budget holds (f16 rows of the embed dim plus a 4-byte norm each) */
  residentTokens: number;
  /** false: not even one compressor fits next to a recompute sequence */
  fits: boolean;
}

export interface ModelInfo {
  id: string; // served model name
  path: string;
  architecture: string;
  backend: string; // "cpu" | "cuda"
  device: string;
  /** slow paths the backend fell back to (no cuBLAS, a driver older than the runtime): said at start and in /health */
  deviceWarnings: string[];
  memory: MemoryPlan;
  trainedContext: number; // max_position_embeddings
  vocabSize: number;
  numLayers: number;
  /** kind: q / k / v projection or o, the attention output (src/model/types.ts HeadKind) */
  heads: { layer: number; kind: "q" | "k" | "v" | "o"; head: number }[];
  exitLayer: number;
  /** sampling defaults of the model's generation_config.json (src/model/generation-config.ts); the OpenAI routes
   * apply them to the fields a request leaves out unless the server runs with --generation-config openai */
  generation: SamplingDefaults;
  defaults: {
    budget: number;
    maxBudget: number;
    chunkSize: number;
    capacity: number;
    maxTokens: number;
    maxNewTokens: number;
    /** longest recompute: prompt (template + gathered context + question) + max_tokens */
    maxModelLen: number;
    /** longest context the recurrent baselines ("h2o", "streaming") accept */
    maxH2oTokens: number;
    /** disk all contexts together may use (uploads beyond it: 413 disk_quota_exceeded); 0 = no limit */
    maxDiskBytes: number;
    /** smoothing window and always-kept edges (each side) at the default budget; both scale with a request's budget */
    smoothingWindow: number;
    /** how far the smoothing window trails each token at the default budget (0 = centered); scales with the budget */
    smoothingLag: number;
    /** how scores are pooled over the smoothing window (the heads file's "smoothing") */
    smoothing: "mean" | "max";
    edge: number;
    /** tokens of the budget that complete the gathered passages' sentences, at the default budget (0 = off) */
    sentenceTail: number;
    /** how far from the selection's lowest smoothed score to its best a gathered token must reach (0 = off) */
    scoreFloor: number;
    /** the background each question token's scores count from (background.ts) */
    scoreBackground: ScoreBackground;
    /** longest question reform embeds for scoring (what is left of the window on top of the cache) */
    maxQueryTokens: number;
    /** the recurrent baselines' cache: this many times the budget, bounded by the window */
    baselineCacheFactor: number;
    /** inline REFORM's implicit contexts: at most this many, idle at most this long, this much disk (0 = none) */
    inlineMaxContexts: number;
    inlineMaxAgeSec: number;
    inlineMaxDiskBytes: number;
    /** tokens of the chat template around the context and an empty question */
    templateTokens: number;
    /** started with --allow-beyond-window (max_model_len or chunk + capacity may exceed the trained window) */
    allowBeyondWindow: boolean;
  };
  /** the upload-time compressor */
  compressor: {
    chunkSize: number;
    capacity: number;
    nSink: number;
    nRecent: number;
    obsWindow: number;
    /** which entries a full cache keeps (src/engine/eviction.ts; the heads file's "eviction") */
    eviction: "h2o" | "streaming" | "tova";
    embedDim: number;
    embedDtype: "f16" | "f32";
    exitLayer: number;
    /** BOS the compressed stream starts with (as in training), null when the model uses none */
    bosTokenId: number | null;
  };
}

export interface EngineMetrics {
  tokensProcessedTotal: number; // context tokens compressed since start
  tokensGeneratedTotal: number;
  promptTokensTotal: number;
  requestsTotal: number;
  queueDepth: number; // jobs waiting in the engine queue
  activeContexts: number;
  diskBytes: number; // files of all contexts
  residentBytes: number; // device memory of the resident context embeddings now
  residentContexts: number; // contexts whose embeddings are resident now
  residentEvictions: number; // resident stores dropped for room or under memory pressure since start
  ttftSeconds: number[]; // recent samples (bounded)
  tpotSeconds: number[]; // recent samples (bounded)
  inline: InlineMetrics;
}

/** Inline REFORM's cache of implicit contexts (inline.ts). */
export interface InlineMetrics {
  requests: number; // queries served by inline REFORM
  hits: number; // the whole compressed part was cached
  extends: number; // a cached prefix was extended (only the new tokens compressed)
  misses: number; // compressed from scratch
  shared: number; // joined a compression in flight
  appendedTokens: number; // tokens compressed for inline requests
  evictions: number;
  contexts: number; // implicit contexts held
  diskBytes: number; // their files
  memoBytes: number; // the tokenization memo (memory)
}

/** Metrics of an engine that has done nothing yet. */
export function emptyMetrics(): EngineMetrics {
  return {
    tokensProcessedTotal: 0,
    tokensGeneratedTotal: 0,
    promptTokensTotal: 0,
    requestsTotal: 0,
    queueDepth: 0,
    activeContexts: 0,
    diskBytes: 0,
    residentBytes: 0,
    residentContexts: 0,
    residentEvictions: 0,
    ttftSeconds: [],
    tpotSeconds: [],
    inline: {
      requests: 0,
      hits: 0,
      extends: 0,
      misses: 0,
      shared: 0,
      appendedTokens: 0,
      evictions: 0,
      contexts: 0,
      diskBytes: 0,
      memoBytes: 0,
    },
  };
}

/** Errors the engine reports to callers; `status` is the HTTP status the API should use. */
export class EngineError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
  ) {
    super(message);
    this.name = "EngineError";
  }
}

export interface EngineClient {
  /** "loading" until the model is loaded; "failed" with loadError if it could not be. */
  state(): "loading" | "ready" | "failed";
  loadError(): string | null;
  ready(): Promise<void>;
  modelInfo(): ModelInfo | null;

  createContext(opts?: { metadata?: Record<string, unknown> }): Promise<ContextInfo>;
  /** Append raw UTF-8 bytes (a piece of a stream; pieces may split multi-byte characters).
   * Resolves once the piece is durably stored (tokens on disk) and its complete chunks compressed. */
  append(id: string, bytes: Uint8Array): Promise<ContextInfo>;
  /** Flush the tokenizer tail buffer and compress everything; state becomes "ready". */
  finalize(id: string): Promise<ContextInfo>;
  getContext(id: string): Promise<ContextInfo | null>;
  listContexts(): Promise<ContextInfo[]>;
  deleteContext(id: string): Promise<boolean>;
  /** Progress notifications (each state/progress change); null once the context is deleted (by a client or by the
   * inline cache), after which nothing more comes. Returns an unsubscribe function. */
  subscribe(id: string, cb: (info: ContextInfo | null) => void): () => void;

  /** Stream an answer. Throws EngineError before the first event for request errors. */
  query(req: QueryRequest): AsyncIterable<QueryEvent>;
  /** Count tokens of a text (for usage / validation). */
  countTokens(text: string): Promise<number>;
  /** Token ids of a text (no special tokens added; `addSpecial`: BOS as a prompt gets it). */
  tokenize(text: string, addSpecial?: boolean): Promise<number[]>;
  /** Text of token ids (ids outside the vocabulary: EngineError 400). */
  detokenize(ids: number[], skipSpecial?: boolean): Promise<string>;

  metrics(): EngineMetrics;
  close(): Promise<void>;
}
