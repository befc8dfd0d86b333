// The demo page: start an export of a project, follow it through the gateway with the client
// module, cancel it, download its archive when it completes, and browse the project's history.
// Everything the page shows about a job is the client's fold of the server's events.

import { ExportLogClient, isTerminal } from "./exportlog-client.js";

const $ = (id) => document.getElementById(id);

const TOKEN_KEY = "exportlog-demo.token";
const PROJECT_KEY = "exportlog-demo.project";
// Per tab: the jobs this tab started (their archive downloads here when they complete) and the
// ones already downloaded (a reload does not download them again).
const STARTED_KEY = "exportlog-demo.started";
const DOWNLOADED_KEY = "exportlog-demo.downloaded";

let gatewayUrl = null;
let client = null;
let current = null; // { jobId, projectId } of the job on show
const started = loadSet(STARTED_KEY);
const downloaded = loadSet(DOWNLOADED_KEY);
const downloading = new Set();
const history = new Map(); // jobId -> history item

function loadSet(key) {
  try {
    return new Set(JSON.parse(sessionStorage.getItem(key) || "[]"));
  } catch {
    return new Set();
  }
}

function saveSet(key, set) {
  sessionStorage.setItem(key, JSON.stringify([...set]));
}

function token() {
  return $("token").value.trim();
}

function project() {
  return $("project").value.trim() || "demo";
}

function notice(text) {
  const element = $("notice");
  element.textContent = text || "";
  element.hidden = !text;
}

async function api(path, init = {}) {
  const headers = { Authorization: `Bearer ${token()}`, ...(init.headers || {}) };
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) {
    const reason = response.statusText || `HTTP ${response.status}`;
    let detail = "";
    try {
      const body = await response.json();
      detail = body.message || body.error || "";
    } catch {
      // not JSON
    }
    throw new Error(`${response.status} ${detail || reason}`);
  }
  return response;
}

const encode = encodeURIComponent;
const jobPath = (projectId, jobId) => `/projects/${encode(projectId)}/export/${encode(jobId)}`;

// --- the gateway URL -----------------------------------------------------------------------------

async function findGateway() {
  const asked = new URLSearchParams(location.search).get("gateway");
  if (asked) return asked;
  try {
    const response = await fetch("config.json", { cache: "no-store" });
    if (response.ok) {
      const config = await response.json();
      if (config.gatewayUrl) return config.gatewayUrl;
    }
  } catch {
    // fall back below
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.hostname}:8081/ws`;
}

// --- the client ----------------------------------------------------------------------------------

function connect() {
  if (client !== null) client.close();
  client = null;
  if (!token()) {
    showConnection("idle");
    return;
  }
  client = new ExportLogClient({
    url: gatewayUrl,
    token: () => token(),
    onState: (jobId, state) => {
      if (current !== null && jobId === current.jobId) render(state);
      updateHistoryItem(jobId, state);
      maybeDownload(jobId, state);
    },
    onConnection: showConnection,
    onError: (error) => {
      console.warn("gateway:", error.code, error.message);
      notice(`Gateway: ${error.message} (${error.code})`);
    },
  });
  if (current !== null) client.follow(current.jobId);
}

function showConnection(status, detail = {}) {
  const element = $("connection");
  element.dataset.status = status;
  let text = { idle: "no token", connecting: "connecting…", open: "connected" }[status] ?? status;
  if (status === "reconnecting") {
    const seconds = detail.delay != null ? ` in ${(detail.delay / 1000).toFixed(1)} s` : "";
    text = `reconnecting${seconds}${detail.code ? ` (closed ${detail.code})` : ""}`;
  } else if (status === "closed") {
    text = "disconnected";
  }
  element.textContent = text;
}

function show(jobId, projectId) {
  if (current !== null && current.jobId === jobId) return;
  if (current !== null && client !== null) client.unfollow(current.jobId);
  current = { jobId, projectId };
  $("job").hidden = false;
  $("job-id").textContent = jobId;
  const known = client?.state(jobId);
  if (known) render(known);
  else renderEmpty();
  client?.follow(jobId);
}

// --- rendering the job ---------------------------------------------------------------------------

function renderEmpty() {
  setBar(0);
  for (const id of ["status", "phase", "stage", "message", "eta"]) $(id).textContent = "–";
  $("job").dataset.status = "none";
  $("download-note").textContent = "";
  $("cancel").disabled = true;
}

function setBar(progress) {
  const value = Math.max(0, Math.min(100, progress));
  const bar = $("bar");
  bar.setAttribute("aria-valuenow", String(value));
  $("bar-fill").style.width = `${value}%`;
  $("percent").textContent = `${Math.floor(value)} %`;
}

function shownStatus(state) {
  if (state.cancelling) return "cancelling";
  return state.status;
}

function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "–";
  const whole = Math.max(0, Math.round(seconds));
  if (whole < 60) return `${whole} s`;
  const minutes = Math.floor(whole / 60);
  return `${minutes} min ${String(whole % 60).padStart(2, "0")} s`;
}

function render(state) {
  const status = shownStatus(state);
  const section = $("job");
  section.dataset.status = status;
  section.dataset.live = String(state.live);
  setBar(state.progress);
  const statusText = status === "cancelling" ? "cancelling…" : status;
  $("status").textContent = state.live ? statusText : `${statusText} (reconnecting…)`;
  $("phase").textContent = state.phase;
  const stage = state.stageProgress
    ? `${state.stage ?? ""} ${state.stageProgress.current}/${state.stageProgress.total}`.trim()
    : (state.stage ?? "–");
  $("stage").textContent = stage;
  let message = state.message?.text || state.message?.key || "–";
  if (state.status === "failed" && state.failure) {
    message = state.failure.message?.text || state.failure.code;
  }
  $("message").textContent = message;
  const running = !isTerminal(state) && state.status !== "queued";
  $("eta").textContent = running ? formatDuration(state.estimatedTimeRemaining) : "–";
  $("cancel").disabled = isTerminal(state) || state.cancelling;
  $("cancel").textContent = state.cancelling ? "Cancelling…" : "Cancel";
  let note = "";
  if (state.status === "completed" && state.archive) {
    const size = (state.archive.sizeBytes / 1e6).toFixed(1);
    if (state.download?.completed || state.downloadsCompleted > 0) {
      note = `Downloaded ${state.archive.fileName} (${size} MB).`;
    } else if (state.download) {
      const sent = (state.download.bytesSent / 1e6).toFixed(1);
      note = `Downloading ${state.archive.fileName}: ${sent} of ${size} MB…`;
    } else {
      note = `Archive ready: ${state.archive.fileName} (${size} MB).`;
    }
    if (state.archiveExpired) note = "The archive has expired.";
  }
  $("download-note").textContent = note;
}

// --- start, cancel, download ---------------------------------------------------------------------

function options() {
  const formats = [];
  if ($("opt-coco").checked) formats.push("coco");
  if ($("opt-yolo").checked) formats.push("yolo");
  return {
    annotationFormats: formats,
    includeOriginalImages: $("opt-images").checked,
    includeVisualizations: $("opt-visualizations").checked,
    metricsFormats: $("opt-metrics").checked ? ["csv"] : [],
  };
}

async function start() {
  notice("");
  if (!token()) {
    notice("Paste a token first (make run prints one).");
    return;
  }
  const projectId = project();
  localStorage.setItem(PROJECT_KEY, projectId);
  $("start").disabled = true;
  try {
    const response = await api(`/projects/${encode(projectId)}/export`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(options()),
    });
    const accepted = await response.json();
    started.add(accepted.jobId);
    saveSet(STARTED_KEY, started);
    show(accepted.jobId, projectId);
    loadHistory();
  } catch (error) {
    notice(`Could not start the export: ${error.message}`);
  } finally {
    $("start").disabled = false;
  }
}

async function cancel() {
  if (current === null || client === null) return;
  const { jobId } = current;
  try {
    const ack = await client.cancel(jobId);
    if (!ack.accepted) notice(`Not cancelled: the export had already ended (${ack.outcome}).`);
  } catch (error) {
    notice(`Cancel refused: ${error.message}`);
  }
}

function maybeDownload(jobId, state) {
  if (state.status !== "completed" || !state.archive || state.archiveExpired) return;
  if (!started.has(jobId) || downloaded.has(jobId) || downloading.has(jobId)) return;
  downloadArchive(jobId, state.projectId, state.archive.fileName);
}

// The download needs the bearer token, which a plain link cannot send: fetch the archive with
// it, then hand the bytes to the browser as a file through an object URL.
async function downloadArchive(jobId, projectId, fileName) {
  downloading.add(jobId);
  try {
    const response = await api(`${jobPath(projectId, jobId)}/download`);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = $("download-link");
    link.href = url;
    link.download = fileName;
    link.click();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    downloaded.add(jobId);
    saveSet(DOWNLOADED_KEY, downloaded);
  } catch (error) {
    notice(`Download failed: ${error.message}`);
  } finally {
    downloading.delete(jobId);
  }
}

// --- history and timelines -----------------------------------------------------------------------

async function loadHistory() {
  if (!token()) return;
  const projectId = project();
  let page;
  try {
    page = await (await api(`/projects/${encode(projectId)}/export/history?limit=20`)).json();
  } catch (error) {
    notice(`Could not load the history: ${error.message}`);
    return;
  }
  const list = $("history");
  const open = new Set(
    [...list.querySelectorAll("details[open]")].map((element) => element.dataset.job),
  );
  list.replaceChildren();
  history.clear();
  const jobs = [...page.jobs].sort((a, b) => b.createdAt.localeCompare(a.createdAt));
  for (const item of jobs) {
    history.set(item.jobId, item);
    list.append(historyItem(item, projectId, open.has(item.jobId)));
    const live = client?.state(item.jobId);
    if (live) updateHistoryItem(item.jobId, live);
  }
  if (current === null && jobs.length > 0) show(jobs[0].jobId, projectId);
}

function historyItem(item, projectId, open) {
  const entry = document.createElement("li");
  const details = document.createElement("details");
  details.dataset.job = item.jobId;
  const summary = document.createElement("summary");
  const when = new Date(item.createdAt).toLocaleString();
  const label = document.createElement("span");
  label.className = "summary-text";
  summary.append(label);
  const follow = document.createElement("button");
  follow.type = "button";
  follow.className = "small";
  follow.textContent = "show";
  follow.addEventListener("click", (event) => {
    event.preventDefault();
    show(item.jobId, projectId);
  });
  summary.append(" ", follow);
  const timeline = document.createElement("ol");
  timeline.className = "timeline";
  details.append(summary, timeline);
  details.addEventListener("toggle", () => {
    if (details.open) loadTimeline(projectId, item.jobId, timeline);
  });
  details.dataset.when = when;
  setSummary(details, item.state.status, item.state.progress);
  details.open = open;
  entry.append(details);
  return entry;
}

function setSummary(details, status, progress) {
  const label = details.querySelector(".summary-text");
  const shortId = details.dataset.job.slice(0, 8);
  label.textContent = `${details.dataset.when} · ${shortId} · ${status} · ${Math.floor(progress)} %`;
  details.dataset.status = status;
}

function updateHistoryItem(jobId, state) {
  const details = document.querySelector(`#history details[data-job="${CSS.escape(jobId)}"]`);
  if (details !== null) setSummary(details, shownStatus(state), state.progress);
}

function describe(event) {
  const data = event.data || {};
  const parts = [];
  if (typeof data.progress === "number") parts.push(`${Math.floor(data.progress)} %`);
  if (data.toPhase) parts.push(`${data.fromPhase} → ${data.toPhase}`);
  const text = data.message?.text;
  if (text) parts.push(text);
  if (data.archive) parts.push(`${data.archive.fileName}`);
  if (data.code) parts.push(data.code);
  if (data.bytesSent != null) parts.push(`${data.bytesSent} bytes`);
  return parts.join(" · ");
}

async function loadTimeline(projectId, jobId, list) {
  list.replaceChildren(Object.assign(document.createElement("li"), { textContent: "loading…" }));
  try {
    const response = await api(`${jobPath(projectId, jobId)}/timeline`);
    const timeline = await response.json();
    list.replaceChildren();
    for (const entry of timeline.entries) {
      const item = document.createElement("li");
      item.dataset.type = entry.event.type;
      const time = document.createElement("span");
      time.className = "time";
      time.textContent = `+${entry.sinceFirst.toFixed(1)} s`;
      const type = document.createElement("code");
      type.textContent = entry.event.type.replace(/^export:/, "");
      const detail = document.createElement("span");
      detail.textContent = describe(entry.event);
      item.append(time, " ", type, " ", detail);
      list.append(item);
    }
    if (timeline.hasMore) {
      list.append(Object.assign(document.createElement("li"), { textContent: "…" }));
    }
  } catch (error) {
    list.replaceChildren(
      Object.assign(document.createElement("li"), { textContent: `failed: ${error.message}` }),
    );
  }
}

// --- start-up ------------------------------------------------------------------------------------

async function main() {
  $("token").value = localStorage.getItem(TOKEN_KEY) || "";
  $("project").value = localStorage.getItem(PROJECT_KEY) || "demo";
  $("token").addEventListener("change", () => {
    localStorage.setItem(TOKEN_KEY, token());
    connect();
    loadHistory();
  });
  $("project").addEventListener("change", () => {
    localStorage.setItem(PROJECT_KEY, project());
    loadHistory();
  });
  $("start").addEventListener("click", start);
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", loadHistory);
  gatewayUrl = await findGateway();
  document.body.dataset.gateway = gatewayUrl;
  connect();
  await loadHistory();
  document.body.dataset.ready = "true";
}

main();
