"""The helper processes of a benchmark, and what the benchmark reads about them.

A WebSocket server and its load client share the machine's two cores: each runs in a process of
its own, so that neither steals the other's event loop and each one's CPU time and memory can be
read on its own (from /proc). The benchmark drives its helpers over a JSON-lines channel: one
request per line on the helper's stdin, one answer per line on its stdout, in order. The helper
writes nothing else to stdout; its logs and errors go to stderr, which is the benchmark's.

Parent side: `Child.start(...)`, `await child.request("name", key=value)`, `await child.stop()`.
Child side: `serve({"name": handler, ...}, hello={...})` inside the helper's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "REPO_ROOT",
    "Child",
    "ChildError",
    "counter_deltas",
    "cpu_seconds",
    "raise_open_files",
    "rss_kib",
    "run_loop",
    "serve",
    "tcp_counters",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# Answers can carry every receive time of a measurement: allow long lines.
_LINE_LIMIT = 1 << 28
_STOP_SECONDS = 15.0

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(dict[str, Any])


class ChildError(RuntimeError):
    """A helper answered with an error, or died."""


class Child:
    """A helper process driven over its stdin and stdout."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.hello: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        hello: bool = True,
        timeout: float = 30.0,
    ) -> Child:
        """Start `python <argv>` from the repository root; wait for its first line (its hello:
        the port it listens on, say) unless `hello` is False."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env=dict(os.environ if env is None else env),
            limit=_LINE_LIMIT,
        )
        child = cls(name, process)
        if hello:
            try:
                async with asyncio.timeout(timeout):
                    child.hello = await child._read()
            except BaseException:
                await child.stop()
                raise
        return child

    async def request(self, command: str, **params: Any) -> dict[str, Any]:
        """Send one request and wait for its answer (requests to one child never interleave)."""
        async with self._lock:
            stdin = self.process.stdin
            assert stdin is not None
            stdin.write(_encoder.encode({"cmd": command, **params}) + b"\n")
            await stdin.drain()
            answer = await self._read()
        if not answer.get("ok", False):
            raise ChildError(f"{self.name}: {command} failed: {answer.get('error')}")
        return answer

    async def _read(self) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        line = await stdout.readline()
        if not line:
            code = await self.process.wait()
            raise ChildError(f"{self.name} exited with status {code}")
        return _decoder.decode(line)

    async def stop(self, *, quit_command: bool = True, timeout: float = _STOP_SECONDS) -> None:
        """Ask the helper to quit (a `quit` request, or SIGTERM), then kill it if it lingers."""
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, ConnectionError, OSError):
                if quit_command and process.stdin is not None:
                    process.stdin.write(b'{"cmd": "quit"}\n')
                    await process.stdin.drain()
                else:
                    process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.stdin is not None:
            process.stdin.close()
            with contextlib.suppress(ConnectionError, OSError):
                await process.stdin.wait_closed()


# --------------------------------------------------------------------------- the child side

Handler = Callable[..., Awaitable[dict[str, Any]]]


def _write(payload: Mapping[str, Any]) -> None:
    sys.stdout.buffer.write(_encoder.encode(payload) + b"\n")
    sys.stdout.buffer.flush()


async def serve(handlers: Mapping[str, Handler], *, hello: Mapping[str, Any]) -> None:
    """Answer requests from stdin, one at a time, until `quit` or the end of stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _write(hello)
    while True:
        line = await reader.readline()
        if not line:
            return
        request = _decoder.decode(line)
        command = request.pop("cmd", None)
        if command == "quit":
            return
        handler = handlers.get(str(command))
        if handler is None:
            _write({"ok": False, "error": f"unknown command {command!r}"})
            continue
        try:
            answer = await handler(**request)
        except Exception as exc:
            _write({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        _write({"ok": True, **answer})


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a helper's main coroutine on uvloop when it is installed (the service runs on it)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
        return
    uvloop.run(main)


# --------------------------------------------------------------------------- /proc readings


def raise_open_files(wanted: int) -> int:
    """Raise this process's open-files limit towards `wanted` (up to the hard limit); children
    started afterwards inherit it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def rss_kib(pid: int) -> int | None:
    """Resident memory of a process in KiB (VmRSS), None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used, None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    hertz = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / hertz


TCP_COUNTERS = ("ListenOverflows", "ListenDrops", "PruneCalled", "TCPTimeouts")
"""Kernel counters (TcpExt) that show a benchmark measuring the network stack's trouble rather
than a server: connections dropped at a full accept queue, receive queues pruned because a
reader fell behind (on loopback the dropped segments are then retransmitted after a timeout,
during which both ends sit idle), and retransmission timeouts."""


def tcp_counters() -> dict[str, int] | None:
    """`TCP_COUNTERS` since boot, machine-wide; None where /proc/net/netstat is missing."""
    try:
        with open("/proc/net/netstat", encoding="ascii") as netstat:
            lines = netstat.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {name: int(table.get(name, 0)) for name in TCP_COUNTERS}
    return None


def counter_deltas(
    before: Mapping[str, int] | None, after: Mapping[str, int] | None
) -> dict[str, int] | None:
    """What changed between two `tcp_counters` readings (None when either is missing)."""
    if before is None or after is None:
        return None
    return {name: after[name] - before.get(name, 0) for name in after}
