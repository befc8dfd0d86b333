// Types of exportlog-client.js, written from the contract in schemas/ (events.py, state.py,
// wire.py) and its JSON Schemas (schemas/json/*.schema.json). Field names are the wire's
// camelCase; a field marked optional (`?`) is left out of the JSON when it has its default.

// --- Shared values -------------------------------------------------------------------------------

/** An RFC 3339 date-time with its time zone, e.g. "2025-03-01T12:00:00Z". */
export type Timestamp = string;
export type Phase = "processing" | "downloading";
export type Stage = "images" | "visualizations" | "annotations" | "metrics" | "compression";
export type CancelledBy = "user" | "system" | "timeout";
export type Status = "queued" | "running" | "cancelling" | "completed" | "failed" | "cancelled";
export type ParamValue = string | number;

/** A human message: a catalogue key (schemas/messages.py), its parameters, the English text. */
export interface Message {
  key: string;
  /** Left out when empty. */
  params?: Record<string, ParamValue>;
  /** Left out when empty. */
  text?: string;
}

export interface StageProgress {
  current: number;
  total: number;
  currentItem?: string | null;
}

export interface ExportOptions {
  includeOriginalImages: boolean;
  includeVisualizations: boolean;
  annotationFormats: Array<"coco" | "yolo">;
  metricsFormats: Array<"csv">;
  includeDocumentation: boolean;
}

export interface ArchiveInfo {
  fileName: string;
  sizeBytes: number;
  sha256: string;
  expiresAt?: Timestamp | null;
}

// --- Event payloads (schemas/events.py) ----------------------------------------------------------

export interface QueuedData {
  options?: Partial<ExportOptions>;
  requestedBy?: string;
  queuePosition?: number | null;
}
export interface StartedData {
  workerId?: string;
  attempt?: number;
  totalItems?: number | null;
}
export interface ResumedData {
  workerId?: string;
  previousWorker?: string;
  attempt?: number;
  fromStage?: Stage | null;
  reason?: string;
}
export interface ProgressData {
  phase: Phase;
  stage?: Stage | null;
  /** Overall progress of the job, 0 to 100, both phases included. */
  progress: number;
  /** Progress within the current phase, 0 to 100. */
  phaseProgress: number;
  stageProgress?: StageProgress | null;
  message?: Message | null;
  /** Seconds, from a smoothed rate; absent until the rate is known. */
  estimatedTimeRemaining?: number | null;
}
export interface PhaseChangedData {
  fromPhase: Phase;
  toPhase: Phase;
  progress: number;
  message?: Message | null;
}
export interface CancelRequestedData {
  requestedBy?: string;
  reason?: string | null;
}
export interface CancelledData {
  cancelledBy?: CancelledBy;
  progress?: number;
  cleanupCompleted?: boolean;
  message?: Message | null;
}
export interface FailedData {
  stage?: Stage | null;
  code: string;
  message?: Message | null;
  retryable?: boolean;
  progress?: number;
}
export interface CompletedData {
  archive: ArchiveInfo;
  processingTimeMs?: number;
  message?: Message | null;
}
export interface DownloadStartedData {
  downloadId: string;
  totalBytes: number;
  rangeStart?: number;
}
export interface DownloadProgressData {
  downloadId: string;
  bytesSent: number;
  totalBytes: number;
  progress: number;
  phaseProgress?: number;
}
export interface DownloadCompletedData {
  downloadId: string;
  bytesSent: number;
  totalBytes?: number;
}
export interface ArchiveExpiredData {
  reason?: string;
}

/** Every event type this version knows, with its payload. */
export interface EventDataByType {
  "export:queued": QueuedData;
  "export:started": StartedData;
  "export:resumed": ResumedData;
  "export:progress": ProgressData;
  "export:phase-changed": PhaseChangedData;
  "export:cancel-requested": CancelRequestedData;
  "export:cancelled": CancelledData;
  "export:failed": FailedData;
  "export:completed": CompletedData;
  "export:download-started": DownloadStartedData;
  "export:download-progress": DownloadProgressData;
  "export:download-completed": DownloadCompletedData;
  "export:archive-expired": ArchiveExpiredData;
}
export type EventType = keyof EventDataByType;

interface EnvelopeFields {
  jobId: string;
  projectId: string;
  /** The event's place in its job's stream: 1, 2, 3, … with no gap. */
  seq: number;
  /** The event's place in the whole log (with gaps). */
  position: number;
  eventId: string;
  occurredAt: Timestamp;
  /** Who caused it: "user:<id>", "worker:<id>", "system:<name>". */
  actor: string;
}

/** One event in its envelope (schemas/json/envelope.schema.json). */
export type KnownEvent = {
  [T in EventType]: EnvelopeFields & { type: T; data: EventDataByType[T] };
}[EventType];

/** An event of a type from a newer version: folded as a no-op. */
export type UnknownEvent = EnvelopeFields & { type: string; data: Record<string, unknown> };

export type Event = KnownEvent | UnknownEvent;

// --- Job state (schemas/state.py, schemas/json/job-state.schema.json) ----------------------------

export interface FailureInfo {
  stage: Stage | null;
  code: string;
  message: Message | null;
  retryable: boolean;
}

export interface CancellationInfo {
  cancelledBy: CancelledBy;
  cleanupCompleted: boolean;
  requestedBy: string | null;
}

export interface DownloadInfo {
  downloadId: string;
  bytesSent: number;
  totalBytes: number;
  completed: boolean;
}

/** What a job is, as of event `seq`: the fold of its events. */
export interface JobState {
  jobId: string;
  projectId: string;
  seq: number;
  status: Status;
  options: ExportOptions;
  requestedBy: string;
  phase: Phase;
  stage: Stage | null;
  /** Overall, 0 to 100: processing takes it to 90, the download phase to 100. Never goes back. */
  progress: number;
  /** Within the current phase, 0 to 100. Never goes back within a phase. */
  phaseProgress: number;
  stageProgress: StageProgress | null;
  message: Message | null;
  /** Seconds. */
  estimatedTimeRemaining: number | null;
  attempt: number;
  queuedAt: Timestamp | null;
  startedAt: Timestamp | null;
  finishedAt: Timestamp | null;
  updatedAt: Timestamp | null;
  cancelRequestedBy: string | null;
  archive: ArchiveInfo | null;
  archiveExpired: boolean;
  failure: FailureInfo | null;
  cancellation: CancellationInfo | null;
  download: DownloadInfo | null;
  downloadsCompleted: number;
}

/** A job's state as the client shows it. */
export interface JobView extends JobState {
  /** From `cancel()` (or the server's cancel-requested) until the job ends or the cancel is
   * refused. The status itself changes only through the server's events. */
  cancelling: boolean;
  /** Caught up with the log and receiving live events. */
  live: boolean;
}

// --- Server messages (schemas/wire.py, schemas/json/server-message.schema.json) ------------------

export interface StatusSync {
  type: "export:status-sync";
  jobId: string;
  seq: number;
  state?: JobState;
}
export interface Replay {
  type: "export:replay";
  jobId: string;
  events: Event[];
}
export interface CaughtUp {
  type: "export:caught-up";
  jobId: string;
  seq: number;
}
export interface EndOfStream {
  type: "export:end-of-stream";
  jobId: string;
  seq: number;
}
export interface CancelAck {
  type: "export:cancel-ack";
  jobId: string;
  /** True: cancel requested (`seq` of export:cancel-requested). False: the job had already
   * ended (`outcome`). */
  accepted: boolean;
  seq?: number | null;
  outcome?: string | null;
}
export interface Heartbeat {
  type: "heartbeat";
  /** Seconds between heartbeats. */
  interval: number;
}
export interface Pong {
  type: "pong";
}
export interface Authenticated {
  type: "authenticated";
  user: string;
}
export interface ErrorMessage {
  type: "error";
  code: string;
  message: string;
  /** The job the error is about, when it is about one. */
  jobId?: string;
  /** The request it answers: "subscribe" or "export:cancel". */
  request?: string;
}
export type ServerMessage =
  | StatusSync
  | Replay
  | CaughtUp
  | EndOfStream
  | CancelAck
  | Heartbeat
  | Pong
  | Authenticated
  | ErrorMessage
  | Event;

// --- The fold ------------------------------------------------------------------------------------

export const PROCESSING_SHARE: 90;
export const TERMINAL_STATUSES: readonly ["completed", "failed", "cancelled"];
export const EVENT_TYPES: readonly EventType[];

export function initialState(jobId: string, projectId: string): JobState;
export function isTerminal(state: JobState | null | undefined): boolean;
/** Apply one event; pure and total, like `schemas.state.fold`. */
export function fold(state: JobState | null, event: Event): JobState;
export function replay(events: Iterable<Event>, state?: JobState | null): JobState | null;
/** A payload decoded for its type, or undefined for an unknown type or a malformed payload. */
export function decodeData(type: string, data: unknown): Record<string, unknown> | undefined;
/** A date-time as msgspec writes it, or null when msgspec would refuse it. */
export function canonicalTimestamp(text: string): Timestamp | null;

// --- The client ----------------------------------------------------------------------------------

export const CloseCode: Readonly<{
  AUTH_FAILED: 4001;
  TOKEN_EXPIRED: 4003;
  RESUME: 4008;
  LIMIT: 4029;
  TOO_BIG: 1009;
  UNAVAILABLE: 1011;
  RESTART: 1012;
}>;

export type ConnectionStatus = "connecting" | "open" | "reconnecting" | "closed";

export interface ConnectionDetail {
  /** The close code of the connection that was lost. */
  code?: number;
  reason?: string;
  /** Milliseconds until the next attempt. */
  delay?: number;
}

export class ExportLogError extends Error {
  /** The gateway's error code ("not_found", "forbidden", "unavailable", …), or "closed",
   * "auth_failed", "token", "connect" from the client itself. */
  readonly code: string;
  readonly jobId: string | null;
  constructor(code: string, message: string, jobId?: string | null);
}

/** What the client needs of a WebSocket: the browser's interface. The client sets the handlers
 * and calls them with `{data}` (message) and `{code, reason}` (close) events; their parameters
 * are `any` so that the browser's own WebSocket (whose handlers take its event classes) fits. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ExportLogClientOptions {
  /** The gateway's WebSocket URL, e.g. "ws://127.0.0.1:8081/ws". */
  url: string;
  /** A JWT, or a function giving one; the function is called again after 4001 and 4003. A fixed
   * string that the gateway refuses (4001) or lets expire (4003) closes the client. */
  token: string | (() => string | Promise<string>);
  /** Defaults to the global WebSocket (browsers; Node 22 and later). */
  WebSocket?: WebSocketConstructor;
  /** The job's state after each frame that changed it (and after each status-sync). */
  onState?: (jobId: string, state: JobView) => void;
  /** Each event received in order, replayed or live, after duplicates were dropped. */
  onEvent?: (event: Event, info: { jobId: string; live: boolean }) => void;
  onConnection?: (status: ConnectionStatus, detail?: ConnectionDetail) => void;
  /** Errors from the gateway that no cancel() was waiting for, and failures to connect. */
  onError?: (error: ExportLogError) => void;
  /** Full-jitter exponential backoff in milliseconds: a delay drawn from 0 to
   * min(cap, base * 2^attempt). Defaults: base 500, cap 30000. */
  backoff?: { base?: number; cap?: number; random?: () => number };
  /** Milliseconds without any message before a ping is sent. Default: the server's heartbeat
   * interval plus 5 s (20 s until the first heartbeat). */
  pingAfter?: number | null;
  /** Milliseconds to wait for an answer to a ping before the connection is given up. Default
   * 10000. */
  pongTimeout?: number;
  /** Milliseconds a connection may take to open before it is given up. Default 10000. */
  connectTimeout?: number;
}

export class ExportLogClient {
  constructor(options: ExportLogClientOptions);
  /** The connection's status; null before the first attempt. */
  readonly connection: ConnectionStatus | null;
  /** Follow a job: by default from its first event (`afterSeq` 0), so the whole history folds;
   * `afterSeq: null` gives the current state, then live events. */
  follow(jobId: string, options?: { afterSeq?: number | null }): void;
  unfollow(jobId: string): void;
  state(jobId: string): JobView | null;
  jobs(): string[];
  /** Resolves with the cancel-ack (accepted, or refused for a job that has already ended);
   * rejects with an ExportLogError when the gateway answers with an error. */
  cancel(jobId: string): Promise<CancelAck>;
  close(): void;
}
