// A minimal WebSocket client with the browser's interface, for running the client against a real
// gateway under Node 20 (which has no global WebSocket). Test-only: ws:// (no TLS), no
// extensions, text frames; it answers pings and echoes the server's close frame.

import { createHash, randomBytes } from "node:crypto";
import net from "node:net";

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

export class MiniWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  #socket;
  #buffer = Buffer.alloc(0);
  #key = randomBytes(16).toString("base64");
  #handshaken = false;
  #fragments = [];
  #closeCode = null;
  #closeReason = "";
  #finished = false;

  constructor(url, protocols = []) {
    const target = new URL(url);
    if (target.protocol !== "ws:") throw new SyntaxError(`only ws:// here, not ${target.protocol}`);
    this.url = url;
    this.readyState = MiniWebSocket.CONNECTING;
    this.protocol = "";
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    const offered = typeof protocols === "string" ? [protocols] : protocols;
    this.#socket = net.connect(Number(target.port || 80), target.hostname);
    this.#socket.setNoDelay(true);
    this.#socket.on("connect", () => {
      const lines = [
        `GET ${target.pathname}${target.search} HTTP/1.1`,
        `Host: ${target.host}`,
        "Upgrade: websocket",
        "Connection: Upgrade",
        `Sec-WebSocket-Key: ${this.#key}`,
        "Sec-WebSocket-Version: 13",
      ];
      if (offered.length) lines.push(`Sec-WebSocket-Protocol: ${offered.join(", ")}`);
      this.#socket.write(`${lines.join("\r\n")}\r\n\r\n`);
    });
    this.#socket.on("data", (chunk) => this.#receive(chunk));
    this.#socket.on("error", (error) => this.onerror?.({ error }));
    this.#socket.on("close", () => this.#finish(this.#closeCode ?? 1006, this.#closeReason));
  }

  send(text) {
    if (this.readyState !== MiniWebSocket.OPEN) throw new Error("the socket is not open");
    this.#write(0x1, Buffer.from(String(text), "utf8"));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= MiniWebSocket.CLOSING) return;
    if (this.readyState === MiniWebSocket.CONNECTING) {
      this.readyState = MiniWebSocket.CLOSING;
      this.#socket.destroy();
      return;
    }
    this.readyState = MiniWebSocket.CLOSING;
    const payload = Buffer.alloc(2 + Buffer.byteLength(reason));
    payload.writeUInt16BE(code, 0);
    payload.write(reason, 2);
    this.#write(0x8, payload);
    this.#closeCode ??= code;
    // The server answers with its close frame and ends the connection; do not wait forever.
    setTimeout(() => this.#socket.destroy(), 1000).unref();
  }

  #receive(chunk) {
    this.#buffer = Buffer.concat([this.#buffer, chunk]);
    if (!this.#handshaken) {
      const end = this.#buffer.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = this.#buffer.subarray(0, end).toString("latin1").split("\r\n");
      this.#buffer = this.#buffer.subarray(end + 4);
      const accept = createHash("sha1").update(this.#key + GUID).digest("base64");
      const headers = new Map(
        head.slice(1).map((line) => {
          const colon = line.indexOf(":");
          return [line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()];
        }),
      );
      if (!/^HTTP\/1\.1 101/.test(head[0]) || headers.get("sec-websocket-accept") !== accept) {
        this.#socket.destroy();
        return;
      }
      this.#handshaken = true;
      this.protocol = headers.get("sec-websocket-protocol") ?? "";
      this.readyState = MiniWebSocket.OPEN;
      this.onopen?.({});
    }
    while (this.#frame()) {
      // one frame at a time until the buffer holds no complete frame
    }
  }

  #frame() {
    const buf = this.#buffer;
    if (buf.length < 2) return false;
    const fin = (buf[0] & 0x80) !== 0;
    const opcode = buf[0] & 0x0f;
    let length = buf[1] & 0x7f;
    let offset = 2;
    if (length === 126) {
      if (buf.length < 4) return false;
      length = buf.readUInt16BE(2);
      offset = 4;
    } else if (length === 127) {
      if (buf.length < 10) return false;
      length = Number(buf.readBigUInt64BE(2));
      offset = 10;
    }
    const masked = (buf[1] & 0x80) !== 0;
    const mask = masked ? buf.subarray(offset, offset + 4) : null;
    if (masked) offset += 4;
    if (buf.length < offset + length) return false;
    const payload = Buffer.from(buf.subarray(offset, offset + length));
    if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
    this.#buffer = buf.subarray(offset + length);
    switch (opcode) {
      case 0x0:
      case 0x1:
      case 0x2:
        this.#fragments.push(payload);
        if (fin) {
          const data = Buffer.concat(this.#fragments).toString("utf8");
          this.#fragments = [];
          if (this.readyState === MiniWebSocket.OPEN) this.onmessage?.({ data });
        }
        break;
      case 0x8: {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        this.#closeReason = payload.subarray(2).toString("utf8");
        if (this.readyState === MiniWebSocket.OPEN) {
          this.#closeCode = code;
          this.readyState = MiniWebSocket.CLOSING;
          this.#write(0x8, payload.subarray(0, 2));
        }
        this.#socket.end();
        break;
      }
      case 0x9:
        if (this.readyState === MiniWebSocket.OPEN) this.#write(0xa, payload);
        break;
      default:
        break;
    }
    return true;
  }

  #write(opcode, payload) {
    const length = payload.length;
    const head = length < 126 ? 2 : length < 65536 ? 4 : 10;
    const frame = Buffer.alloc(head + 4 + length);
    frame[0] = 0x80 | opcode;
    if (length < 126) {
      frame[1] = 0x80 | length;
    } else if (length < 65536) {
      frame[1] = 0x80 | 126;
      frame.writeUInt16BE(length, 2);
    } else {
      frame[1] = 0x80 | 127;
      frame.writeBigUInt64BE(BigInt(length), 2);
    }
    const mask = randomBytes(4);
    mask.copy(frame, head);
    for (let i = 0; i < length; i++) frame[head + 4 + i] = payload[i] ^ mask[i % 4];
    if (!this.#socket.destroyed) this.#socket.write(frame);
  }

  #finish(code, reason) {
    if (this.#finished) return;
    this.#finished = true;
    this.readyState = MiniWebSocket.CLOSED;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }
}
