// A stand-in for the gateway in the client's tests: a WebSocket class with the browser's
// interface (readyState, send, close, on* handlers) whose other end the test drives.

export class FakeGateway {
  constructor() {
    this.sockets = [];
    const gateway = this;
    this.WebSocket = class FakeWebSocket {
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
        this.readyState = 0;
        this.sent = [];
        this.closedWith = null;
        this.onopen = this.onmessage = this.onerror = this.onclose = null;
        gateway.sockets.push(this);
      }

      send(data) {
        if (this.readyState !== 1) throw new Error("send on a socket that is not open");
        this.sent.push(JSON.parse(data));
      }

      close(code = 1000, reason = "") {
        if (this.readyState >= 2) return;
        this.readyState = 3;
        this.closedWith = { code, reason };
        queueMicrotask(() => this.onclose?.({ code, reason, wasClean: true }));
      }

      // -- the gateway's side --

      open() {
        this.readyState = 1;
        this.onopen?.({});
      }

      push(message) {
        if (this.readyState !== 1) throw new Error("push on a socket that is not open");
        this.onmessage?.({ data: JSON.stringify(message) });
      }

      drop(code, reason = "") {
        this.readyState = 3;
        this.onclose?.({ code, reason, wasClean: false });
      }

      /** What the client sent of one type. */
      sentOf(type) {
        return this.sent.filter((m) => m.type === type);
      }
    };
  }

  /** The `n`-th socket the client opened (1-based), once it exists. */
  async socket(n) {
    await until(() => this.sockets.length >= n, `socket ${n} was not opened`);
    return this.sockets[n - 1];
  }

  /** Open socket `n`, wait for its auth message and authenticate it. */
  async accept(n, user = "ada") {
    const socket = await this.socket(n);
    socket.open();
    await until(() => socket.sentOf("auth").length === 1, "no auth message");
    socket.push({ type: "authenticated", user });
    return socket;
  }
}

/** Wait until `predicate()` holds (checked every few milliseconds), or fail. */
export async function until(predicate, what = "condition not met", timeout = 2000) {
  const deadline = Date.now() + timeout;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`${what} within ${timeout} ms`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
