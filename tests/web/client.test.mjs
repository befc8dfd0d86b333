// The JavaScript client: its fold against the shared vectors (tests/vectors/fold.json, made by
// the Python fold), and its protocol handling against a fake gateway.
//
//   node --test tests/web/

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { describe, test } from "node:test";

import {
  ExportLogClient,
  ExportLogError,
  canonicalTimestamp,
  decodeData,
  fold,
  initialState,
  replay,
} from "../../web/exportlog-client.js";
import { FakeGateway, sleep, until } from "./fake-websocket.mjs";

const VECTORS = JSON.parse(readFileSync(new URL("../vectors/fold.json", import.meta.url), "utf8"));

function deepFreeze(value) {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const inner of Object.values(value)) deepFreeze(inner);
  }
  return value;
}

function vector(name) {
  const found = VECTORS.find((v) => v.name === name);
  assert.ok(found, `no vector named ${name}`);
  return found;
}

// --- The fold ------------------------------------------------------------------------------------

describe("fold vectors", () => {
  test("the file has cases", () => {
    assert.ok(VECTORS.length >= 40);
    assert.ok(VECTORS.some((v) => v.allowedByLog));
  });

  for (const v of VECTORS) {
    test(v.name, () => {
      // Frozen: folding must never change an event or a state it was given (strict mode throws).
      const events = deepFreeze(structuredClone(v.events));
      assert.deepStrictEqual(replay(events), v.expected);
      // Resumed from the state after any prefix, as a status-sync hands it over (JSON).
      for (let k = 0; k < events.length; k++) {
        const before = replay(events.slice(0, k));
        const handed = before === null ? null : deepFreeze(JSON.parse(JSON.stringify(before)));
        assert.deepStrictEqual(replay(events.slice(k), handed), v.expected, `resumed at ${k}`);
      }
    });
  }
});

describe("fold", () => {
  const v = vector("redelivered events are dropped");

  test("a duplicate leaves the very same state", () => {
    const state = replay(v.events.slice(0, 3));
    assert.equal(fold(state, v.events[1]), state);
  });

  test("before the first event the state is the initial one", () => {
    const e = v.events[0];
    assert.deepStrictEqual(fold(null, { ...e, seq: 0 }), initialState(e.jobId, e.projectId));
  });

  test("payloads decode with their defaults and refuse what msgspec refuses", () => {
    assert.deepStrictEqual(decodeData("export:started", {}), {
      workerId: "",
      attempt: 1,
      totalItems: null,
    });
    assert.equal(decodeData("export:started", { attempt: 1.5 }), undefined);
    assert.equal(decodeData("export:started", { attempt: true }), undefined);
    assert.equal(decodeData("export:failed", { code: 3 }), undefined);
    assert.equal(decodeData("export:paused", {}), undefined);
    assert.equal(decodeData("hasOwnProperty", {}), undefined);
  });

  test("timestamps are written as msgspec writes them", () => {
    const cases = {
      "2026-03-01T10:00:00Z": "2026-03-01T10:00:00Z",
      "2026-03-01T10:00:00+00:00": "2026-03-01T10:00:00Z",
      "2026-03-01T10:00:00-00:00": "2026-03-01T10:00:00Z",
      "2026-03-01T10:00:00.5Z": "2026-03-01T10:00:00.500000Z",
      "2026-03-01T10:00:00.000Z": "2026-03-01T10:00:00Z",
      "2026-03-01T10:00:00.123456789Z": "2026-03-01T10:00:00.123457Z",
      "2026-03-01T10:00:00.12345649Z": "2026-03-01T10:00:00.123456Z",
      "2026-12-31T23:59:59.9999995Z": "2027-01-01T00:00:00Z",
      "2026-03-01T10:00:00.120000+02:00": "2026-03-01T10:00:00.120000+02:00",
      "2026-01-01T00:00:00+0200": "2026-01-01T00:00:00+02:00",
      "2026-03-01t10:00:00z": "2026-03-01T10:00:00Z",
      "2026-03-01 10:00:00Z": "2026-03-01T10:00:00Z",
      "2024-02-29T00:00:00Z": "2024-02-29T00:00:00Z",
      "2026-01-01T00:00:00+23:59": "2026-01-01T00:00:00+23:59",
    };
    for (const [text, expected] of Object.entries(cases)) {
      assert.equal(canonicalTimestamp(text), expected, text);
    }
    for (const text of [
      "2026-03-01T10:00Z",
      "2026-03-01T10:00:00",
      "2026-02-29T00:00:00Z",
      "2026-04-31T00:00:00Z",
      "2026-01-01T24:00:00Z",
      "2026-01-01T00:00:60Z",
      "2026-01-01T00:00:00+24:00",
      "0000-01-01T00:00:00Z",
      "2026-01-01T00:00:00.Z",
      "2026-1-01T00:00:00Z",
    ]) {
      assert.equal(canonicalTimestamp(text), null, text);
    }
  });
});

// --- The client against a fake gateway ----------------------------------------------------------

const DOWNLOADED = vector("completed, then downloaded twice (the second a resumed range)");
const EVENTS = DOWNLOADED.events;
const JOB = EVENTS[0].jobId;
const CANCELLED = vector("cancelled mid-way by the user");

/** The server's view of the job after its first `seq` events. */
function stateAt(events, seq) {
  return replay(events.filter((e) => e.seq <= seq));
}

function range(events, from, to) {
  return events.filter((e) => e.seq >= from && e.seq <= to);
}

/** A client on a fake gateway, with everything its callbacks saw. */
function setup(options = {}) {
  const gateway = new FakeGateway();
  const seen = { states: [], events: [], connection: [], errors: [] };
  const client = new ExportLogClient({
    url: "ws://gateway.test/ws",
    token: "token-1",
    WebSocket: gateway.WebSocket,
    backoff: { base: 5, cap: 20 },
    onState: (jobId, state) => seen.states.push({ jobId, ...state }),
    onEvent: (event, info) => seen.events.push({ seq: event.seq, ...info }),
    onConnection: (status, detail) => seen.connection.push({ status, ...detail }),
    onError: (error) => seen.errors.push(error),
    ...options,
  });
  return { gateway, client, seen };
}

/** Answer a subscribe like the gateway: status-sync, one replay frame, caught-up. */
function resume(socket, events, { afterSeq, headSeq, pageSize = 100 }) {
  socket.push({
    type: "export:status-sync",
    jobId: JOB,
    seq: headSeq,
    state: stateAt(events, headSeq),
  });
  let from = afterSeq === undefined ? headSeq : Math.min(afterSeq, headSeq);
  while (from < headSeq) {
    const to = Math.min(from + pageSize, headSeq);
    socket.push({ type: "export:replay", jobId: JOB, events: range(events, from + 1, to) });
    from = to;
  }
  socket.push({ type: "export:caught-up", jobId: JOB, seq: headSeq });
}

function assertNeverBack(states) {
  for (let i = 1; i < states.length; i++) {
    assert.ok(states[i].progress >= states[i - 1].progress, `progress went back at ${i}`);
    assert.ok(states[i].seq >= states[i - 1].seq, `seq went back at ${i}`);
  }
}

describe("client", () => {
  test("status-sync, replay, caught-up, then live events", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      assert.deepStrictEqual(socket.sent, [
        { type: "auth", token: "token-1" },
        { type: "subscribe", jobId: JOB, afterSeq: 0 },
      ]);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 8, pageSize: 3 });
      assert.equal(client.state(JOB).seq, 8);
      assert.equal(client.state(JOB).live, true);
      for (const event of range(EVENTS, 9, EVENTS.length)) socket.push(event);
      assert.deepStrictEqual(
        seen.events.map((e) => e.seq),
        EVENTS.map((e) => e.seq),
      );
      assert.ok(seen.events.slice(0, 8).every((e) => !e.live && e.jobId === JOB));
      assert.ok(seen.events.slice(8).every((e) => e.live));
      const { cancelling, live, ...state } = client.state(JOB);
      assert.deepStrictEqual(state, DOWNLOADED.expected);
      assert.equal(cancelling, false);
      assert.equal(live, true);
      assertNeverBack(seen.states);
      assert.deepStrictEqual(
        seen.connection.map((c) => c.status),
        ["connecting", "open"],
      );
    } finally {
      client.close();
    }
  });

  test("duplicates are dropped; a gap is never applied but resubscribed", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 5 });
      const before = client.state(JOB);
      const calls = seen.states.length;

      socket.push(EVENTS[3]); // seq 4 again
      socket.push({ type: "export:replay", jobId: JOB, events: range(EVENTS, 2, 5) });
      assert.equal(seen.states.length, calls, "a duplicate changed the state");
      assert.deepStrictEqual(client.state(JOB), before);

      socket.push(EVENTS[6]); // seq 7: seq 6 is missing
      assert.equal(client.state(JOB).seq, 5, "an event after a gap was applied");
      assert.deepStrictEqual(socket.sent.slice(-2), [
        { type: "unsubscribe", jobId: JOB },
        { type: "subscribe", jobId: JOB, afterSeq: 5 },
      ]);
      // Frames of the old subscription still in flight are not applied either.
      socket.push(EVENTS[5]);
      socket.push({ type: "export:caught-up", jobId: JOB, seq: 7 });
      assert.equal(client.state(JOB).seq, 5);

      resume(socket, EVENTS, { afterSeq: 5, headSeq: 7 });
      assert.equal(client.state(JOB).seq, 7);
      assert.deepStrictEqual(
        seen.events.map((e) => e.seq),
        [1, 2, 3, 4, 5, 6, 7],
      );
      assertNeverBack(seen.states);
    } finally {
      client.close();
    }
  });

  test("a caught-up past the last event received resubscribes", async () => {
    const { gateway, client } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      socket.push({ type: "export:status-sync", jobId: JOB, seq: 4, state: stateAt(EVENTS, 4) });
      socket.push({ type: "export:replay", jobId: JOB, events: range(EVENTS, 1, 3) });
      socket.push({ type: "export:caught-up", jobId: JOB, seq: 4 });
      assert.deepStrictEqual(socket.sent.at(-1), { type: "subscribe", jobId: JOB, afterSeq: 3 });
    } finally {
      client.close();
    }
  });

  test("after a 1012 close it reconnects and resumes with afterSeq", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const first = await gateway.accept(1);
      resume(first, EVENTS, { afterSeq: 0, headSeq: 6 });
      first.drop(1012, "gateway restarting: resume");
      assert.equal(client.connection, "reconnecting");
      // The last state stays on show, marked as not live.
      assert.equal(client.state(JOB).seq, 6);
      assert.equal(client.state(JOB).live, false);

      const second = await gateway.accept(2);
      assert.deepStrictEqual(second.sent, [
        { type: "auth", token: "token-1" },
        { type: "subscribe", jobId: JOB, afterSeq: 6 },
      ]);
      resume(second, EVENTS, { afterSeq: 6, headSeq: 12 });
      for (const event of range(EVENTS, 13, EVENTS.length)) second.push(event);
      const { cancelling, live, ...state } = client.state(JOB);
      assert.deepStrictEqual(state, DOWNLOADED.expected);
      assert.deepStrictEqual(
        seen.events.map((e) => e.seq),
        EVENTS.map((e) => e.seq),
      );
      assertNeverBack(seen.states);
      assert.deepStrictEqual(
        seen.connection.map((c) => c.status),
        ["connecting", "open", "reconnecting", "open"],
      );
      assert.equal(seen.connection[2].code, 1012);
    } finally {
      client.close();
    }
  });

  test("a status-sync ahead of the events replayed is shown at once, and kept", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      socket.push({ type: "export:status-sync", jobId: JOB, seq: 10, state: stateAt(EVENTS, 10) });
      assert.equal(client.state(JOB).seq, 10);
      socket.push({ type: "export:replay", jobId: JOB, events: range(EVENTS, 1, 10) });
      socket.push({ type: "export:caught-up", jobId: JOB, seq: 10 });
      assert.equal(client.state(JOB).seq, 10);
      assert.equal(seen.events.length, 10, "replayed events still reach onEvent");
      assertNeverBack(seen.states);
    } finally {
      client.close();
    }
  });

  test("full-jitter backoff grows with each failure and starts again after caught-up", async () => {
    const { gateway, client, seen } = setup({ backoff: { base: 4, cap: 16, random: () => 1 } });
    try {
      client.follow(JOB);
      for (let n = 1; n <= 4; n++) (await gateway.socket(n)).drop(1006);
      const third = await gateway.accept(5);
      resume(third, EVENTS, { afterSeq: 0, headSeq: 3 });
      third.drop(1011);
      await gateway.socket(6);
      const delays = seen.connection.filter((c) => c.delay !== undefined).map((c) => c.delay);
      assert.deepStrictEqual(delays, [4, 8, 16, 16, 4]);
    } finally {
      client.close();
    }
  });

  test("jittered delays stay between zero and the ceiling", async () => {
    const draws = [0, 0.5, 0.999];
    const { gateway, client, seen } = setup({
      backoff: { base: 10, cap: 1000, random: () => draws.shift() ?? 0 },
    });
    try {
      for (let n = 1; n <= 3; n++) (await gateway.socket(n)).drop(1006);
      await gateway.socket(4);
      const delays = seen.connection.filter((c) => c.delay !== undefined).map((c) => c.delay);
      assert.deepStrictEqual(delays, [0, 10, 39]);
    } finally {
      client.close();
    }
  });

  test("cancel shows cancelling until the server's cancelled event", async () => {
    const events = CANCELLED.events;
    const { gateway, client, seen } = setup();
    try {
      const jobId = events[0].jobId;
      client.follow(jobId);
      const socket = await gateway.accept(1);
      const requested = events.findIndex((e) => e.type === "export:cancel-requested");
      socket.push({ type: "export:status-sync", jobId, seq: requested, state: replay(events.slice(0, requested)) });
      socket.push({ type: "export:replay", jobId, events: events.slice(0, requested) });
      socket.push({ type: "export:caught-up", jobId, seq: requested });
      assert.equal(client.state(jobId).status, "running");

      const answer = client.cancel(jobId);
      assert.deepStrictEqual(socket.sent.at(-1), { type: "export:cancel", jobId });
      assert.equal(client.state(jobId).cancelling, true);
      assert.equal(client.state(jobId).status, "running", "the status changes only by events");
      assert.equal(seen.states.at(-1).cancelling, true);

      const ack = { type: "export:cancel-ack", jobId, accepted: true, seq: requested + 1 };
      socket.push(ack);
      assert.deepStrictEqual(await answer, ack);
      assert.equal(client.state(jobId).cancelling, true);

      for (const event of events.slice(requested, -1)) {
        socket.push(event);
        assert.equal(client.state(jobId).cancelling, true);
        assert.notEqual(client.state(jobId).status, "cancelled");
      }
      assert.equal(client.state(jobId).status, "cancelling");
      socket.push(events.at(-1));
      socket.push({ type: "export:end-of-stream", jobId, seq: events.at(-1).seq });
      assert.equal(client.state(jobId).status, "cancelled");
      assert.equal(client.state(jobId).cancelling, false);
      // Never cleared, never "cancelled" before the event said so.
      assert.ok(seen.states.every((s) => s.jobId === jobId && s.seq >= 1));
      const firstCancelled = seen.states.findIndex((s) => s.status === "cancelled");
      assert.equal(firstCancelled, seen.states.length - 1);
      assert.ok(seen.states.slice(0, -1).every((s) => s.status !== "cancelled"));
    } finally {
      client.close();
    }
  });

  test("a cancel that lost the race to completion is refused; the state is the server's", async () => {
    const { gateway, client } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 8 });
      const answer = client.cancel(JOB);
      assert.equal(client.state(JOB).cancelling, true);
      socket.push(EVENTS[8]); // export:completed, committed before the cancel
      const before = client.state(JOB);
      assert.equal(before.status, "completed");
      assert.equal(before.cancelling, false);
      socket.push({
        type: "export:cancel-ack",
        jobId: JOB,
        accepted: false,
        seq: 9,
        outcome: "completed",
      });
      const ack = await answer;
      assert.equal(ack.accepted, false);
      assert.equal(ack.outcome, "completed");
      assert.deepStrictEqual(client.state(JOB), before);
    } finally {
      client.close();
    }
  });

  test("a cancel the gateway answers with an error is rejected", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 4 });
      const answer = client.cancel(JOB);
      socket.push({ type: "error", code: "forbidden", message: "this token may not cancel that export" });
      await assert.rejects(answer, (error) => {
        assert.ok(error instanceof ExportLogError);
        assert.equal(error.code, "forbidden");
        return true;
      });
      assert.equal(client.state(JOB).cancelling, false);
      assert.equal(seen.errors.length, 0, "an error a cancel was waiting for is not reported twice");
    } finally {
      client.close();
    }
  });

  test("an error naming its job and request rejects that job's cancel", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 4 });
      const answer = client.cancel(JOB);
      socket.push({
        type: "error",
        code: "unavailable",
        message: "try again",
        jobId: JOB,
        request: "export:cancel",
      });
      await assert.rejects(answer, (error) => {
        assert.ok(error instanceof ExportLogError);
        assert.equal(error.code, "unavailable");
        assert.equal(error.jobId, JOB);
        return true;
      });
      assert.equal(client.state(JOB).cancelling, false);
      assert.equal(seen.errors.length, 0);
    } finally {
      client.close();
    }
  });

  test("a cancel in flight when the connection drops is asked again", async () => {
    const { gateway, client } = setup();
    try {
      client.follow(JOB);
      const first = await gateway.accept(1);
      resume(first, EVENTS, { afterSeq: 0, headSeq: 4 });
      const answer = client.cancel(JOB);
      first.drop(1012);
      assert.equal(client.state(JOB).cancelling, true);
      const second = await gateway.accept(2);
      assert.deepStrictEqual(second.sentOf("export:cancel"), [{ type: "export:cancel", jobId: JOB }]);
      const ack = { type: "export:cancel-ack", jobId: JOB, accepted: true, seq: 5 };
      second.push(ack);
      assert.deepStrictEqual(await answer, ack);
    } finally {
      client.close();
    }
  });

  test("on 4003 the token function is called again and the job resumed", async () => {
    let calls = 0;
    const { gateway, client, seen } = setup({
      token: async () => {
        calls += 1;
        return `token-${calls}`;
      },
    });
    try {
      client.follow(JOB);
      const first = await gateway.accept(1);
      assert.deepStrictEqual(first.sentOf("auth"), [{ type: "auth", token: "token-1" }]);
      resume(first, EVENTS, { afterSeq: 0, headSeq: 7 });
      first.drop(4003, "token expired: get a fresh one and resume");
      const second = await gateway.accept(2);
      assert.deepStrictEqual(second.sent, [
        { type: "auth", token: "token-2" },
        { type: "subscribe", jobId: JOB, afterSeq: 7 },
      ]);
      second.drop(1012);
      const third = await gateway.accept(3);
      assert.deepStrictEqual(third.sentOf("auth"), [{ type: "auth", token: "token-2" }]);
      third.drop(4001, "token expired");
      const fourth = await gateway.accept(4);
      assert.deepStrictEqual(fourth.sentOf("auth"), [{ type: "auth", token: "token-3" }]);
      assert.equal(calls, 3);
      assert.equal(client.state(JOB).seq, 7);
      assert.equal(seen.errors.length, 0);
    } finally {
      client.close();
    }
  });

  test("a fixed token that is refused closes the client", async () => {
    const { gateway, client, seen } = setup();
    client.follow(JOB);
    const socket = await gateway.socket(1);
    socket.open();
    socket.drop(4001, "invalid token");
    assert.equal(client.connection, "closed");
    assert.equal(seen.errors[0].code, "auth_failed");
    await sleep(30);
    assert.equal(gateway.sockets.length, 1, "it tried again with the same token");
  });

  test("heartbeats get no answer; silence gets a ping, and no pong a new connection", async () => {
    const { gateway, client, seen } = setup({ pingAfter: 40, pongTimeout: 40 });
    try {
      client.follow(JOB);
      const first = await gateway.accept(1);
      first.push({ type: "heartbeat", interval: 15 });
      const sent = first.sent.length;
      await sleep(15);
      first.push({ type: "heartbeat", interval: 15 });
      assert.equal(first.sent.length, sent, "a heartbeat was answered");

      await until(() => first.sentOf("ping").length === 1, "no ping after a silence");
      first.push({ type: "pong" });
      await sleep(60);
      assert.equal(gateway.sockets.length, 1, "a connection that answered was given up");
      await until(() => first.sentOf("ping").length === 2, "no second ping");
      // No pong this time: the connection is taken for dead.
      const second = await gateway.socket(2);
      assert.equal(first.closedWith?.code, 4000);
      assert.ok(seen.connection.some((c) => c.status === "reconnecting"));
      second.open();
      assert.deepStrictEqual(second.sentOf("subscribe"), [
        { type: "subscribe", jobId: JOB, afterSeq: 0 },
      ]);
    } finally {
      client.close();
    }
  });

  test("a connection that never opens is given up and tried again", async () => {
    const { gateway, client } = setup({ connectTimeout: 30 });
    try {
      const stuck = await gateway.socket(1);
      const second = await gateway.socket(2);
      assert.equal(stuck.closedWith?.code, 4000);
      second.open();
      assert.equal(second.sentOf("auth").length, 1);
    } finally {
      client.close();
    }
  });

  test("following for the state only subscribes without afterSeq", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB, { afterSeq: null });
      const socket = await gateway.accept(1);
      assert.deepStrictEqual(socket.sentOf("subscribe"), [{ type: "subscribe", jobId: JOB }]);
      resume(socket, EVENTS, { headSeq: 9 });
      socket.push(EVENTS[9]);
      assert.equal(client.state(JOB).seq, 10);
      assert.deepStrictEqual(
        seen.events.map((e) => e.seq),
        [10],
      );
      socket.drop(1012);
      const again = await gateway.accept(2);
      assert.deepStrictEqual(again.sentOf("subscribe"), [
        { type: "subscribe", jobId: JOB, afterSeq: 10 },
      ]);
    } finally {
      client.close();
    }
  });

  test("an ended stream is not subscribed again after a reconnect", async () => {
    const events = CANCELLED.events;
    const jobId = events[0].jobId;
    const { gateway, client } = setup();
    try {
      client.follow(jobId);
      client.follow(JOB);
      const first = await gateway.accept(1);
      const last = events.at(-1).seq;
      first.push({ type: "export:status-sync", jobId, seq: last, state: replay(events) });
      first.push({ type: "export:replay", jobId, events });
      first.push({ type: "export:caught-up", jobId, seq: last });
      first.push({ type: "export:end-of-stream", jobId, seq: last });
      first.drop(1012);
      const second = await gateway.accept(2);
      assert.deepStrictEqual(second.sentOf("subscribe"), [
        { type: "subscribe", jobId: JOB, afterSeq: 0 },
      ]);
      assert.equal(client.state(jobId).status, "cancelled");
    } finally {
      client.close();
    }
  });

  test("unfollow unsubscribes and ignores what is still on its way", async () => {
    const { gateway, client, seen } = setup();
    try {
      client.follow(JOB);
      const socket = await gateway.accept(1);
      resume(socket, EVENTS, { afterSeq: 0, headSeq: 3 });
      client.unfollow(JOB);
      assert.deepStrictEqual(socket.sent.at(-1), { type: "unsubscribe", jobId: JOB });
      const calls = seen.states.length;
      socket.push(EVENTS[3]);
      assert.equal(seen.states.length, calls);
      assert.equal(client.state(JOB), null);
      assert.deepStrictEqual(client.jobs(), []);
    } finally {
      client.close();
    }
  });

  test("a job the gateway does not show is reported and not asked for again", async () => {
    const { gateway, client, seen } = setup();
    try {
      const missing = "00000000-0000-4000-8000-000000000000";
      client.follow(missing);
      const socket = await gateway.accept(1);
      socket.push({ type: "error", code: "not_found", message: `no export ${missing} you may follow` });
      assert.equal(seen.errors.length, 1);
      assert.equal(seen.errors[0].code, "not_found");
      assert.equal(seen.errors[0].jobId, missing);
      socket.drop(1012);
      const again = await gateway.accept(2);
      assert.deepStrictEqual(again.sentOf("subscribe"), []);
    } finally {
      client.close();
    }
  });

  test("close() stops for good and rejects the cancels still waiting", async () => {
    const { gateway, client, seen } = setup();
    client.follow(JOB);
    const socket = await gateway.accept(1);
    const answer = client.cancel(JOB);
    client.close();
    await assert.rejects(answer, (error) => error.code === "closed");
    assert.equal(client.connection, "closed");
    assert.equal(socket.closedWith.code, 1000);
    await sleep(30);
    assert.equal(gateway.sockets.length, 1);
    assert.deepStrictEqual(seen.connection.at(-1), { status: "closed" });
    assert.throws(() => client.follow(JOB), ExportLogError);
  });

  const hasWebSocket = typeof globalThis.WebSocket === "function";
  test("without a WebSocket implementation it says so", { skip: hasWebSocket }, () => {
    assert.throws(
      () => new ExportLogClient({ url: "ws://x/ws", token: "t", WebSocket: undefined }),
      /WebSocket/,
    );
  });
});
