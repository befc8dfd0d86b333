"""The WebSocket gateway: read-only on the log; replays on reconnect and fans out live events."""
