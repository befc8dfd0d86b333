// Follows one job through a real gateway with the browser client and reports, one JSON object
// to a line on stdout, every state, event, connection change, error and cancel answer.
// Driven by tests/web/test_live.py: a line "cancel" on stdin asks for a cancel; the end of
// stdin closes the client.
//
//   node tests/web/live-client.mjs ws://127.0.0.1:8081/ws <token> <jobId>

import { createInterface } from "node:readline";

import { ExportLogClient } from "../../web/exportlog-client.js";
import { MiniWebSocket } from "./mini-websocket.mjs";

const [url, token, jobId] = process.argv.slice(2);
const report = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

const client = new ExportLogClient({
  url,
  token,
  WebSocket: globalThis.WebSocket ?? MiniWebSocket,
  backoff: { base: 50, cap: 400 },
  onState: (id, state) => report({ kind: "state", jobId: id, state }),
  onEvent: (event, info) => report({ kind: "event", seq: event.seq, type: event.type, ...info }),
  onConnection: (status, detail) => report({ kind: "connection", status, ...detail }),
  onError: (error) => report({ kind: "error", code: error.code, message: error.message }),
});
client.follow(jobId);

const input = createInterface({ input: process.stdin });
input.on("line", (line) => {
  if (line.trim() === "cancel") {
    report({ kind: "cancel-sent", state: client.state(jobId) });
    client.cancel(jobId).then(
      (ack) => report({ kind: "ack", ack, state: client.state(jobId) }),
      (error) => report({ kind: "cancel-error", code: error.code, message: error.message }),
    );
  }
});
input.on("close", () => {
  client.close();
  process.exit(0);
});
