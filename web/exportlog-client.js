// exportlog browser client: follow export jobs through the gateway's WebSocket and fold their
// events into job state by the same rules as `schemas/state.py`.
//
// No dependencies and no build step: an ES module for browsers and Node 20 (which has no global
// WebSocket; pass one in the options there). The fold is exported on its own so that the shared
// test vectors (`tests/vectors/fold.json`) can check it against the Python one.

// --- The fold ------------------------------------------------------------------------------------

/** Overall progress spent on processing; the download phase has the rest (schemas/events.py). */
export const PROCESSING_SHARE = 90;

/** Statuses that absorb every later event (except the download phase after completion). */
export const TERMINAL_STATUSES = Object.freeze(["completed", "failed", "cancelled"]);

/** Statuses after which the gateway ends a job's stream. */
const END_STATUSES = new Set(["failed", "cancelled"]);

const PHASES = ["processing", "downloading"];
const STAGES = ["images", "visualizations", "annotations", "metrics", "compression"];
const CANCELLED_BY = ["user", "system", "timeout"];

/** The state of a job before its first event (`initial_state`). */
export function initialState(jobId, projectId) {
  return {
    jobId,
    projectId,
    seq: 0,
    status: "queued",
    options: defaultOptions(),
    requestedBy: "",
    phase: "processing",
    stage: null,
    progress: 0,
    phaseProgress: 0,
    stageProgress: null,
    message: null,
    estimatedTimeRemaining: null,
    attempt: 0,
    queuedAt: null,
    startedAt: null,
    finishedAt: null,
    updatedAt: null,
    cancelRequestedBy: null,
    archive: null,
    archiveExpired: false,
    failure: null,
    cancellation: null,
    download: null,
    downloadsCompleted: 0,
  };
}

/** Whether a state is final (completed jobs still take the download phase). */
export function isTerminal(state) {
  return state != null && TERMINAL_STATUSES.includes(state.status);
}

/**
 * Apply one event envelope to a job's state; `state` is null before the first event.
 *
 * Pure and total, like the Python fold: the arguments are never changed, nothing is thrown, an
 * event at or below the state's seq is a duplicate and leaves the state as it is (the same
 * object), and an unknown type or a payload that does not match its type's schema only moves
 * `seq` and `updatedAt`.
 */
export function fold(state, event) {
  if (state == null) state = initialState(event.jobId, event.projectId);
  if (!(event.seq > state.seq)) return state;
  const at = canonicalTimestamp(event.occurredAt) ?? event.occurredAt;
  const data = decodeData(event.type, event.data);
  const next = data === undefined ? state : apply(state, event.type, data, at);
  return { ...next, seq: event.seq, updatedAt: at };
}

/** Fold a sequence of events, optionally on top of a known state. */
export function replay(events, state = null) {
  for (const event of events) state = fold(state, event);
  return state;
}

function clamp(value) {
  return value < 0 ? 0 : value > 100 ? 100 : value;
}

function running(state) {
  return state.status === "cancelling" ? "cancelling" : "running";
}

function apply(state, type, data, at) {
  const terminal = isTerminal(state);
  switch (type) {
    case "export:queued":
      if (state.seq !== 0) return state;
      return {
        ...state,
        status: "queued",
        options: data.options,
        requestedBy: data.requestedBy,
        queuedAt: at,
      };
    case "export:started":
    case "export:resumed":
      if (terminal) return state;
      return {
        ...state,
        status: running(state),
        attempt: Math.max(state.attempt + 1, data.attempt),
        startedAt: state.startedAt ?? at,
      };
    case "export:progress":
      if (terminal || data.phase !== state.phase) return state;
      // Progress only moves forward within a phase: a late or reordered report (a retried
      // stage, a resumed worker) must not pull the bar back.
      return {
        ...state,
        status: running(state),
        stage: data.stage ?? state.stage,
        progress: Math.max(state.progress, clamp(data.progress)),
        phaseProgress: Math.max(state.phaseProgress, clamp(data.phaseProgress)),
        stageProgress: data.stageProgress,
        message: data.message ?? state.message,
        estimatedTimeRemaining: data.estimatedTimeRemaining,
      };
    case "export:phase-changed":
      // Phases only go forward: processing, then downloading.
      if (terminal || data.toPhase === state.phase || data.toPhase === "processing") return state;
      return {
        ...state,
        phase: data.toPhase,
        phaseProgress: 0,
        progress: Math.max(state.progress, clamp(data.progress)),
        message: data.message ?? state.message,
        stage: null,
        stageProgress: null,
        estimatedTimeRemaining: null,
      };
    case "export:cancel-requested":
      if (terminal || state.status === "cancelling") return state;
      return { ...state, status: "cancelling", cancelRequestedBy: data.requestedBy };
    case "export:cancelled":
      if (terminal) return state;
      return {
        ...state,
        status: "cancelled",
        finishedAt: at,
        progress: Math.max(state.progress, clamp(data.progress)),
        message: data.message ?? state.message,
        estimatedTimeRemaining: null,
        cancellation: {
          cancelledBy: data.cancelledBy,
          cleanupCompleted: data.cleanupCompleted,
          requestedBy: state.cancelRequestedBy,
        },
      };
    case "export:failed":
      if (terminal) return state;
      return {
        ...state,
        status: "failed",
        finishedAt: at,
        message: data.message ?? state.message,
        estimatedTimeRemaining: null,
        failure: {
          stage: data.stage,
          code: data.code,
          message: data.message,
          retryable: data.retryable,
        },
      };
    case "export:completed":
      if (terminal) return state;
      return {
        ...state,
        status: "completed",
        finishedAt: at,
        progress: Math.max(state.progress, PROCESSING_SHARE),
        phaseProgress: state.phase === "processing" ? 100 : state.phaseProgress,
        stage: null,
        stageProgress: null,
        message: data.message ?? state.message,
        estimatedTimeRemaining: null,
        archive: data.archive,
      };
    case "export:download-started":
      if (state.status !== "completed" || state.archiveExpired) return state;
      return {
        ...state,
        phase: "downloading",
        phaseProgress: state.phase !== "downloading" ? 0 : state.phaseProgress,
        download: {
          downloadId: data.downloadId,
          bytesSent: data.rangeStart,
          totalBytes: data.totalBytes,
          completed: false,
        },
      };
    case "export:download-progress":
      if (state.status !== "completed" || state.phase !== "downloading") return state;
      return {
        ...state,
        progress: Math.max(state.progress, clamp(data.progress)),
        phaseProgress: Math.max(state.phaseProgress, clamp(data.phaseProgress)),
        download: {
          downloadId: data.downloadId,
          bytesSent: data.bytesSent,
          totalBytes: data.totalBytes,
          completed: false,
        },
      };
    case "export:download-completed":
      if (state.status !== "completed" || state.phase !== "downloading") return state;
      return {
        ...state,
        progress: 100,
        phaseProgress: 100,
        downloadsCompleted: state.downloadsCompleted + 1,
        download: {
          downloadId: data.downloadId,
          bytesSent: data.bytesSent,
          totalBytes: data.totalBytes || data.bytesSent,
          completed: true,
        },
      };
    case "export:archive-expired":
      if (state.status !== "completed") return state;
      return { ...state, archiveExpired: true };
    default:
      return state;
  }
}

// --- Payload decoding ----------------------------------------------------------------------------
//
// The Python fold decodes a payload with msgspec against its type's Struct and skips the event
// when that fails. These decoders accept and refuse what msgspec does (required fields, types,
// literal values, defaults, unknown fields ignored) and give nested values the shape msgspec
// encodes them in (fields equal to their default left out where the Struct omits defaults), so
// that a state folded here is deep-equal to the gateway's. One difference cannot be helped: JSON
// `5.0` in an integer field, which msgspec refuses, parses to the same number as `5` here.

const BAD = Symbol("bad");
const REQUIRED = Symbol("required");

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

const str = (v) => (typeof v === "string" ? v : BAD);
const int = (v) => (typeof v === "number" && Number.isInteger(v) ? v : BAD);
const float = (v) => (typeof v === "number" && Number.isFinite(v) ? v : BAD);
const bool = (v) => (typeof v === "boolean" ? v : BAD);
const literal = (values) => (v) => (values.includes(v) ? v : BAD);
const nullable = (decode) => (v) => (v === null ? null : decode(v));
const timestamp = (v) => (typeof v === "string" ? (canonicalTimestamp(v) ?? BAD) : BAD);

function arrayOf(decode) {
  return (v) => {
    if (!Array.isArray(v)) return BAD;
    const out = [];
    for (const item of v) {
      const decoded = decode(item);
      if (decoded === BAD) return BAD;
      out.push(decoded);
    }
    return out;
  };
}

function params(v) {
  if (!isObject(v)) return BAD;
  const entries = Object.entries(v);
  for (const [, value] of entries) {
    if (typeof value !== "string" && float(value) === BAD) return BAD;
  }
  return Object.fromEntries(entries);
}

/**
 * A decoder for an object with `fields` ({name: [decode, default]}, REQUIRED for no default).
 * `omitDefaults` leaves out the fields equal to their default, as msgspec's `omit_defaults`.
 */
function struct(fields, { omitDefaults = false } = {}) {
  const names = Object.keys(fields);
  return (v) => {
    if (!isObject(v)) return BAD;
    const out = {};
    for (const name of names) {
      const [decode, fallback] = fields[name];
      let value;
      if (Object.prototype.hasOwnProperty.call(v, name)) {
        value = decode(v[name]);
        if (value === BAD) return BAD;
      } else if (fallback === REQUIRED) {
        return BAD;
      } else {
        value = typeof fallback === "function" ? fallback() : fallback;
      }
      if (omitDefaults && isDefault(value, fallback)) continue;
      out[name] = value;
    }
    return out;
  };
}

function isDefault(value, fallback) {
  if (fallback === REQUIRED) return false;
  if (typeof fallback === "function") {
    // The only factory defaults that are omitted are empty containers.
    return isObject(value) && Object.keys(value).length === 0;
  }
  return value === fallback;
}

function defaultOptions() {
  return {
    includeOriginalImages: true,
    includeVisualizations: true,
    annotationFormats: ["coco"],
    metricsFormats: ["csv"],
    includeDocumentation: true,
  };
}

const message = struct(
  { key: [str, REQUIRED], params: [params, () => ({})], text: [str, ""] },
  { omitDefaults: true },
);
const stageProgress = struct(
  { current: [int, REQUIRED], total: [int, REQUIRED], currentItem: [nullable(str), null] },
  { omitDefaults: true },
);
const options = struct({
  includeOriginalImages: [bool, true],
  includeVisualizations: [bool, true],
  annotationFormats: [arrayOf(literal(["coco", "yolo"])), () => ["coco"]],
  metricsFormats: [arrayOf(literal(["csv"])), () => ["csv"]],
  includeDocumentation: [bool, true],
});
const archive = struct(
  {
    fileName: [str, REQUIRED],
    sizeBytes: [int, REQUIRED],
    sha256: [str, REQUIRED],
    expiresAt: [nullable(timestamp), null],
  },
  { omitDefaults: true },
);
const stage = nullable(literal(STAGES));
const optionalMessage = nullable(message);

const PAYLOADS = {
  "export:queued": struct({
    options: [options, defaultOptions],
    requestedBy: [str, ""],
    queuePosition: [nullable(int), null],
  }),
  "export:started": struct({
    workerId: [str, ""],
    attempt: [int, 1],
    totalItems: [nullable(int), null],
  }),
  "export:resumed": struct({
    workerId: [str, ""],
    previousWorker: [str, ""],
    attempt: [int, 1],
    fromStage: [stage, null],
    reason: [str, "lease expired"],
  }),
  "export:progress": struct({
    phase: [literal(PHASES), REQUIRED],
    stage: [stage, null],
    progress: [float, REQUIRED],
    phaseProgress: [float, REQUIRED],
    stageProgress: [nullable(stageProgress), null],
    message: [optionalMessage, null],
    estimatedTimeRemaining: [nullable(float), null],
  }),
  "export:phase-changed": struct({
    fromPhase: [literal(PHASES), REQUIRED],
    toPhase: [literal(PHASES), REQUIRED],
    progress: [float, REQUIRED],
    message: [optionalMessage, null],
  }),
  "export:cancel-requested": struct({
    requestedBy: [str, ""],
    reason: [nullable(str), null],
  }),
  "export:cancelled": struct({
    cancelledBy: [literal(CANCELLED_BY), "user"],
    progress: [float, 0],
    cleanupCompleted: [bool, false],
    message: [optionalMessage, null],
  }),
  "export:failed": struct({
    stage: [stage, null],
    code: [str, REQUIRED],
    message: [optionalMessage, null],
    retryable: [bool, false],
    progress: [float, 0],
  }),
  "export:completed": struct({
    archive: [archive, REQUIRED],
    processingTimeMs: [int, 0],
    message: [optionalMessage, null],
  }),
  "export:download-started": struct({
    downloadId: [str, REQUIRED],
    totalBytes: [int, REQUIRED],
    rangeStart: [int, 0],
  }),
  "export:download-progress": struct({
    downloadId: [str, REQUIRED],
    bytesSent: [int, REQUIRED],
    totalBytes: [int, REQUIRED],
    progress: [float, REQUIRED],
    phaseProgress: [float, 0],
  }),
  "export:download-completed": struct({
    downloadId: [str, REQUIRED],
    bytesSent: [int, REQUIRED],
    totalBytes: [int, 0],
  }),
  "export:archive-expired": struct({ reason: [str, "retention"] }),
};

/** The event types this version knows. */
export const EVENT_TYPES = Object.freeze(Object.keys(PAYLOADS));

/**
 * A payload decoded for its event type (defaults filled in, nested values in their wire shape),
 * or undefined for an unknown type or a payload that does not match its type's schema.
 */
export function decodeData(type, data) {
  if (!Object.prototype.hasOwnProperty.call(PAYLOADS, type)) return undefined;
  const decoded = PAYLOADS[type](data);
  return decoded === BAD ? undefined : decoded;
}

const RFC3339 =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):?(\d{2}))$/;

function pad(value, width) {
  return String(value).padStart(width, "0");
}

/**
 * An RFC 3339 time with its zone, written as msgspec writes it (`Z` for a zero offset,
 * microseconds when there are any), or null when msgspec would refuse it.
 */
export function canonicalTimestamp(text) {
  if (typeof text !== "string") return null;
  const m = RFC3339.exec(text);
  if (m === null) return null;
  let [year, month, day, hour, minute, second] = m.slice(1, 7).map(Number);
  const fraction = m[7];
  if (fraction !== undefined && fraction.length === 0) return null;
  if (year < 1 || month < 1 || month > 12 || day < 1) return null;
  const lastDay = new Date(Date.UTC(2000, month, 0));
  lastDay.setUTCFullYear(year, month, 0);
  if (day > lastDay.getUTCDate() || hour > 23 || minute > 59 || second > 59) return null;
  let micros = 0;
  if (fraction !== undefined) {
    micros = Number(fraction.slice(0, 6).padEnd(6, "0"));
    if (fraction.length > 6 && fraction[6] >= "5") micros += 1;
  }
  if (micros === 1_000_000) {
    // Rounded up into the next second: carry through minutes, days, months and years.
    micros = 0;
    const d = new Date(0);
    d.setUTCFullYear(year, month - 1, day);
    d.setUTCHours(hour, minute, second + 1, 0);
    year = d.getUTCFullYear();
    if (year > 9999) return null;
    [month, day, hour, minute, second] = [
      d.getUTCMonth() + 1,
      d.getUTCDate(),
      d.getUTCHours(),
      d.getUTCMinutes(),
      d.getUTCSeconds(),
    ];
  }
  let zone = "Z";
  if (m[8] === undefined) {
    const offsetHours = Number(m[10]);
    const offsetMinutes = Number(m[11]);
    if (offsetHours > 23 || offsetMinutes > 59) return null;
    if (offsetHours !== 0 || offsetMinutes !== 0) {
      zone = `${m[9]}${pad(offsetHours, 2)}:${pad(offsetMinutes, 2)}`;
    }
  }
  const date = `${pad(year, 4)}-${pad(month, 2)}-${pad(day, 2)}`;
  const time = `${pad(hour, 2)}:${pad(minute, 2)}:${pad(second, 2)}`;
  return `${date}T${time}${micros ? `.${pad(micros, 6)}` : ""}${zone}`;
}

// --- The client ----------------------------------------------------------------------------------

/** Close codes of the gateway (README, "Following exports live"). */
export const CloseCode = Object.freeze({
  AUTH_FAILED: 4001,
  TOKEN_EXPIRED: 4003,
  RESUME: 4008,
  LIMIT: 4029,
  TOO_BIG: 1009,
  UNAVAILABLE: 1011,
  RESTART: 1012,
});

/** The code this client closes a connection with when the server stopped answering. */
const CLOSE_NO_ANSWER = 4000;
const OPEN = 1;

/** An error the gateway sent, or a cancel that could not be asked for. */
export class ExportLogError extends Error {
  constructor(code, message, jobId = null) {
    super(message);
    this.name = "ExportLogError";
    this.code = code;
    this.jobId = jobId;
  }
}

function noop() {}

/**
 * Follows export jobs through the gateway, over one WebSocket that it keeps open.
 *
 * It connects when made, and after a drop reconnects with full-jitter exponential backoff (the
 * attempt count starts again after a caught-up). On every (re)connect it authenticates with the
 * first message and subscribes to each followed job with the last seq it saw, so the gateway
 * answers with a status-sync, the missed events and caught-up. Events at or below the last seq
 * are dropped; an event past the next seq (a gap) is never applied: the job is subscribed again
 * from the last seq. State changes are reported once per frame through `onState`.
 */
export class ExportLogClient {
  #url;
  #tokenSource;
  #WebSocket;
  #onState;
  #onEvent;
  #onConnection;
  #onError;
  #base;
  #cap;
  #random;
  #pingAfter;
  #pongTimeout;
  #connectTimeout;
  #heartbeatMs = null;

  #jobs = new Map();
  #cancels = [];
  #socket = null;
  #authenticated = false;
  #token = null;
  #tokenStale = true;
  #attempt = 0;
  #status = null;
  #closed = false;
  #everOpen = false;
  #retryTimer = null;
  #idleTimer = null;
  #pongTimer = null;
  #connectTimer = null;
  #lastMessageAt = 0;

  constructor(options) {
    const {
      url,
      token,
      WebSocket: Socket = globalThis.WebSocket,
      onState = noop,
      onEvent = noop,
      onConnection = noop,
      onError = noop,
      backoff = {},
      pingAfter = null,
      pongTimeout = 10_000,
      connectTimeout = 10_000,
    } = options ?? {};
    if (typeof url !== "string" || !url) throw new TypeError("ExportLogClient needs a url");
    if (typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("ExportLogClient needs a token: a string or a function returning one");
    }
    if (typeof Socket !== "function") {
      throw new TypeError("no WebSocket here: pass a WebSocket implementation in the options");
    }
    this.#url = url;
    this.#tokenSource = token;
    this.#WebSocket = Socket;
    this.#onState = onState;
    this.#onEvent = onEvent;
    this.#onConnection = onConnection;
    this.#onError = onError;
    this.#base = backoff.base ?? 500;
    this.#cap = backoff.cap ?? 30_000;
    this.#random = backoff.random ?? Math.random;
    this.#pingAfter = pingAfter;
    this.#pongTimeout = pongTimeout;
    this.#connectTimeout = connectTimeout;
    this.#connect();
  }

  /** "connecting" | "open" | "reconnecting" | "closed". */
  get connection() {
    return this.#status;
  }

  /**
   * Follow a job. By default its whole history is replayed (`afterSeq` 0) so that its state is
   * folded from its events; `{afterSeq: null}` asks for its current state and live events only,
   * and a number resumes after that seq.
   */
  follow(jobId, { afterSeq = 0 } = {}) {
    if (this.#closed) throw new ExportLogError("closed", "the client is closed", jobId);
    if (this.#jobs.has(jobId)) return;
    const job = {
      id: jobId,
      state: null,
      lastSeq: afterSeq,
      sentAfter: undefined,
      synced: false,
      live: false,
      subscribed: false,
      ended: false,
      cancelling: false,
    };
    this.#jobs.set(jobId, job);
    if (this.#authenticated) this.#subscribe(job);
  }

  /** Stop following a job; its state is forgotten. */
  unfollow(jobId) {
    const job = this.#jobs.get(jobId);
    if (job === undefined) return;
    this.#jobs.delete(jobId);
    if (job.subscribed && this.#authenticated) this.#send({ type: "unsubscribe", jobId });
  }

  /** The job's state as last folded, with `cancelling` and `live`; null before its first sync. */
  state(jobId) {
    const job = this.#jobs.get(jobId);
    return job === undefined ? null : this.#view(job);
  }

  /** The ids of the jobs followed. */
  jobs() {
    return [...this.#jobs.keys()];
  }

  /**
   * Ask for a job to be cancelled. Resolves with the gateway's `export:cancel-ack` (`accepted`,
   * or refused with the `outcome` of a job that has already ended); rejects with an
   * ExportLogError when the gateway answers with an error. From the call until the server's
   * `export:cancelled` event (or a refusal) the job's view has `cancelling: true`; the state
   * itself changes only through the server's events. A cancel in flight when the connection
   * drops is asked again after the reconnect (the export service answers a repeated cancel as
   * the first one).
   */
  cancel(jobId) {
    if (this.#closed) {
      return Promise.reject(new ExportLogError("closed", "the client is closed", jobId));
    }
    return new Promise((resolve, reject) => {
      const request = { jobId, resolve, reject, sent: false };
      this.#cancels.push(request);
      const job = this.#jobs.get(jobId);
      if (job !== undefined && !job.cancelling) {
        job.cancelling = true;
        this.#emitState(job);
      }
      if (this.#authenticated) this.#sendCancel(request);
    });
  }

  /** Close the connection for good. Cancels still waiting for an answer are rejected. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#clearTimers();
    const socket = this.#socket;
    this.#detach();
    if (socket !== null) {
      try {
        socket.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    for (const request of this.#cancels.splice(0)) {
      request.reject(new ExportLogError("closed", "the client was closed", request.jobId));
    }
    this.#setStatus("closed");
  }

  // -- connection -------------------------------------------------------------------------------

  #setStatus(status, detail, always = false) {
    if (this.#status === status && !always) return;
    this.#status = status;
    this.#onConnection(status, detail);
  }

  async #connect() {
    this.#retryTimer = null;
    if (this.#closed) return;
    this.#setStatus(this.#everOpen || this.#attempt > 0 ? "reconnecting" : "connecting");
    let token;
    try {
      token = await this.#currentToken();
    } catch (error) {
      this.#onError(new ExportLogError("token", `no token: ${error?.message ?? error}`));
      this.#scheduleReconnect();
      return;
    }
    if (this.#closed) return;
    let socket;
    try {
      socket = new this.#WebSocket(this.#url);
    } catch (error) {
      this.#onError(new ExportLogError("connect", `cannot connect: ${error?.message ?? error}`));
      this.#scheduleReconnect();
      return;
    }
    this.#socket = socket;
    this.#authenticated = false;
    // A handshake that never completes (a network that drops packets) is given up on.
    this.#connectTimer = setTimeout(
      () => this.#giveUp(CLOSE_NO_ANSWER, "connect timed out"),
      this.#connectTimeout,
    );
    socket.onopen = () => {
      if (socket !== this.#socket) return;
      clearTimeout(this.#connectTimer);
      this.#connectTimer = null;
      this.#lastMessageAt = Date.now();
      this.#armIdle();
      this.#send({ type: "auth", token });
      // Subscribes and cancels go right behind the auth message: the gateway reads them once
      // the token is verified, and a refused token closes the connection with 4001 anyway.
      this.#authenticated = true;
      for (const job of this.#jobs.values()) {
        job.subscribed = false;
        if (!job.ended) this.#subscribe(job);
      }
      for (const request of this.#cancels) {
        request.sent = false;
        this.#sendCancel(request);
      }
    };
    socket.onmessage = (event) => {
      if (socket !== this.#socket) return;
      this.#receive(event.data);
    };
    socket.onerror = () => {};
    socket.onclose = (event) => {
      if (socket !== this.#socket) return;
      this.#lost(event.code, event.reason);
    };
  }

  async #currentToken() {
    if (typeof this.#tokenSource === "string") return this.#tokenSource;
    if (this.#tokenStale || this.#token === null) {
      const token = await this.#tokenSource();
      if (typeof token !== "string" || !token) throw new Error("the token function gave no token");
      this.#token = token;
      this.#tokenStale = false;
    }
    return this.#token;
  }

  #detach() {
    const socket = this.#socket;
    this.#socket = null;
    this.#authenticated = false;
    if (socket !== null) {
      socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null;
    }
    this.#clearIdle();
    for (const job of this.#jobs.values()) {
      job.synced = false;
      job.live = false;
      job.subscribed = false;
    }
  }

  /** The connection is gone (closed by the server, the network, or us for not answering). */
  #lost(code, reason) {
    this.#detach();
    if (this.#closed) return;
    if (code === CloseCode.AUTH_FAILED || code === CloseCode.TOKEN_EXPIRED) {
      if (typeof this.#tokenSource === "string") {
        // A fixed token that was refused will be refused again.
        this.#onError(new ExportLogError("auth_failed", reason || "the token was refused"));
        this.#closed = true;
        this.#clearTimers();
        for (const request of this.#cancels.splice(0)) {
          request.reject(new ExportLogError("auth_failed", "the token was refused", request.jobId));
        }
        this.#setStatus("closed", { code, reason });
        return;
      }
      this.#tokenStale = true;
    }
    if (code === CloseCode.LIMIT) this.#attempt += 2; // asked to slow down
    for (const job of this.#jobs.values()) if (job.state !== null) this.#emitState(job);
    this.#scheduleReconnect({ code, reason });
  }

  /** Try again after a full-jitter delay; `onConnection("reconnecting", …)` says when. */
  #scheduleReconnect(detail = {}) {
    if (this.#closed || this.#retryTimer !== null) return;
    const ceiling = Math.min(this.#cap, this.#base * 2 ** this.#attempt);
    const delay = Math.floor(this.#random() * ceiling);
    this.#attempt += 1;
    this.#setStatus("reconnecting", { ...detail, delay }, true);
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
  }

  #clearTimers() {
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#clearIdle();
  }

  // -- liveness: the server's heartbeats, and our pings when it goes quiet -------------------------

  #idleLimit() {
    if (this.#pingAfter !== null) return this.#pingAfter;
    // A little over the server's heartbeat interval once it is known.
    return this.#heartbeatMs === null ? 20_000 : this.#heartbeatMs + 5_000;
  }

  #armIdle() {
    if (this.#idleTimer !== null) clearTimeout(this.#idleTimer);
    const wait = Math.max(0, this.#lastMessageAt + this.#idleLimit() - Date.now());
    this.#idleTimer = setTimeout(() => this.#checkIdle(), wait);
  }

  #checkIdle() {
    this.#idleTimer = null;
    if (this.#socket === null) return;
    if (Date.now() - this.#lastMessageAt < this.#idleLimit()) {
      this.#armIdle();
      return;
    }
    this.#send({ type: "ping" });
    this.#pongTimer = setTimeout(
      () => this.#giveUp(CLOSE_NO_ANSWER, "no answer to ping"),
      this.#pongTimeout,
    );
  }

  /** Close a connection that stopped answering, without waiting for its closing handshake. */
  #giveUp(code, reason) {
    const socket = this.#socket;
    if (socket === null) return;
    try {
      socket.close(code, reason);
    } catch {
      // a socket that cannot even close is just as dead
    }
    this.#lost(code, reason);
  }

  #clearIdle() {
    for (const timer of [this.#idleTimer, this.#pongTimer, this.#connectTimer]) {
      if (timer !== null) clearTimeout(timer);
    }
    this.#idleTimer = this.#pongTimer = this.#connectTimer = null;
  }

  // -- messages ---------------------------------------------------------------------------------

  #send(message) {
    const socket = this.#socket;
    if (socket === null || socket.readyState !== OPEN) return false;
    socket.send(JSON.stringify(message));
    return true;
  }

  #subscribe(job) {
    const message = { type: "subscribe", jobId: job.id };
    if (job.lastSeq !== null) message.afterSeq = job.lastSeq;
    job.sentAfter = job.lastSeq;
    job.synced = false;
    job.live = false;
    job.subscribed = this.#send(message);
  }

  /** Start the job's subscription again from its last seq: the next status-sync resyncs it. */
  #resubscribe(job) {
    if (job.subscribed) this.#send({ type: "unsubscribe", jobId: job.id });
    job.ended = false;
    this.#subscribe(job);
  }

  #sendCancel(request) {
    request.sent = this.#send({ type: "export:cancel", jobId: request.jobId });
  }

  #receive(raw) {
    this.#lastMessageAt = Date.now();
    if (this.#pongTimer !== null) {
      clearTimeout(this.#pongTimer);
      this.#pongTimer = null;
    }
    if (this.#idleTimer === null) this.#armIdle();
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    if (!isObject(message)) return;
    if ("eventId" in message) {
      // A live event, one to a frame.
      this.#events(message.jobId, [message], true);
      return;
    }
    switch (message.type) {
      case "authenticated":
        this.#everOpen = true;
        if (this.#jobs.size === 0) this.#attempt = 0;
        this.#setStatus("open");
        break;
      case "heartbeat":
        if (typeof message.interval === "number" && message.interval > 0) {
          this.#heartbeatMs = message.interval * 1000;
        }
        break;
      case "pong":
        break;
      case "export:status-sync":
        this.#statusSync(message);
        break;
      case "export:replay":
        if (Array.isArray(message.events) && message.jobId != null) {
          this.#events(message.jobId, message.events, false);
        }
        break;
      case "export:caught-up":
        this.#caughtUp(message);
        break;
      case "export:end-of-stream": {
        const job = this.#jobs.get(message.jobId);
        if (job !== undefined && job.synced) {
          job.ended = true;
          job.subscribed = false;
        }
        break;
      }
      case "export:cancel-ack":
        this.#cancelAck(message);
        break;
      case "error":
        this.#error(message);
        break;
      default:
        break;
    }
  }

  #statusSync(message) {
    const job = message.jobId == null ? undefined : this.#jobs.get(message.jobId);
    if (job === undefined || job.synced) return;
    const seq = typeof message.seq === "number" ? message.seq : 0;
    job.synced = true;
    // The gateway replays from what we asked for, unless that is past its state (a state-only
    // subscribe, or a log that was reset): then it resyncs us to the state's seq.
    job.lastSeq = job.sentAfter == null || job.sentAfter >= seq ? seq : job.sentAfter;
    if (isObject(message.state)) job.state = message.state;
    if (job.cancelling && isTerminal(job.state)) job.cancelling = false;
    this.#emitState(job);
  }

  #events(jobId, events, live) {
    const job = this.#jobs.get(jobId);
    // Before the subscription's status-sync, frames are left over from the one it replaced.
    if (job === undefined || !job.synced) return;
    let changed = false;
    for (const event of events) {
      if (!isObject(event) || typeof event.seq !== "number") continue;
      if (event.seq <= job.lastSeq) continue; // a duplicate
      if (event.seq !== job.lastSeq + 1) {
        // A gap: never fold out of order; ask again from the last seq.
        if (changed) this.#emitState(job);
        this.#resubscribe(job);
        return;
      }
      job.lastSeq = event.seq;
      const next = fold(job.state, event);
      if (next !== job.state) {
        job.state = next;
        changed = true;
      }
      this.#onEvent(event, { jobId, live });
    }
    if (job.cancelling && isTerminal(job.state)) {
      job.cancelling = false;
      changed = true;
    }
    if (changed) this.#emitState(job);
  }

  #caughtUp(message) {
    const job = message.jobId == null ? undefined : this.#jobs.get(message.jobId);
    if (job === undefined || !job.synced) return;
    if (typeof message.seq === "number" && message.seq > job.lastSeq) {
      this.#resubscribe(job); // the replay ended past what we received
      return;
    }
    this.#attempt = 0; // the connection works: the next drop starts the backoff again
    if (!job.live) {
      job.live = true;
      this.#emitState(job);
    }
  }

  #cancelAck(message) {
    const index = this.#cancels.findIndex((r) => r.jobId === message.jobId && r.sent);
    if (index < 0) return;
    const [request] = this.#cancels.splice(index, 1);
    const job = this.#jobs.get(message.jobId);
    if (!message.accepted && job !== undefined && !this.#cancelPending(job.id)) {
      // Refused: the job had already ended. Its outcome comes (or came) through the stream.
      job.cancelling = false;
      this.#emitState(job);
    }
    request.resolve(message);
  }

  #cancelPending(jobId) {
    return this.#cancels.some((r) => r.jobId === jobId);
  }

  #error(message) {
    const code = typeof message.code === "string" ? message.code : "error";
    const text = typeof message.message === "string" ? message.message : "";
    // An error about a job names it (`jobId`) and the request it answers (`request`); a
    // gateway older than those fields is matched by its texts, which name the job.
    let jobId = typeof message.jobId === "string" ? message.jobId : null;
    const answers = typeof message.request === "string" ? message.request : null;
    if (jobId === null) {
      for (const id of this.#jobs.keys()) if (text.includes(id)) jobId = id;
      for (const request of this.#cancels) if (text.includes(request.jobId)) jobId = request.jobId;
    }
    const error = new ExportLogError(code, text, jobId);
    const aboutCancel =
      answers === "export:cancel" ||
      (answers === null && ["not_found", "forbidden", "unavailable"].includes(code));
    if (aboutCancel) {
      // The gateway answers cancels in the order it got them, one at a time.
      const index = this.#cancels.findIndex(
        (r) => r.sent && (jobId === null ? code !== "not_found" : r.jobId === jobId),
      );
      const matched =
        answers === "export:cancel" || jobId !== null || /cancel|export service/.test(text);
      if (index >= 0 && matched) {
        const [request] = this.#cancels.splice(index, 1);
        const job = this.#jobs.get(request.jobId);
        if (job !== undefined && !this.#cancelPending(job.id)) {
          job.cancelling = false;
          this.#emitState(job);
        }
        request.reject(error);
        return;
      }
    }
    if (code === "not_found" && jobId !== null) {
      const job = this.#jobs.get(jobId);
      if (job !== undefined && !job.synced) {
        // Not there, or not ours: the gateway dropped the subscription; do not ask again.
        job.ended = true;
        job.subscribed = false;
      }
    }
    this.#onError(error);
  }

  #view(job) {
    if (job.state === null) return null;
    const cancelling =
      !isTerminal(job.state) && (job.cancelling || job.state.status === "cancelling");
    return { ...job.state, cancelling, live: job.live && this.#socket !== null };
  }

  #emitState(job) {
    const view = this.#view(job);
    if (view !== null) this.#onState(job.id, view);
  }
}
