"""The gateway's settings: GATEWAY_* environment variables, read once in __main__."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    database_url: str = field(
        default="", metadata={"fallback": "DATABASE_URL", "help": "PostgreSQL DSN"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8081, metadata={"help": "WebSocket and HTTP port (0: a free one)"})
    backlog: int = field(
        default=4096, metadata={"help": "connections waiting to be accepted (the listen queue)"}
    )
    pool_max: int = field(default=8, metadata={"help": "database connections at most"})
    poll_interval: float = field(
        default=1.0, metadata={"help": "seconds between reads of the log when no NOTIFY arrives"}
    )
    tail_batch: int = field(default=1000, metadata={"help": "events per tailing query"})
    jwt_secret: str = field(
        default="", metadata={"fallback": "JWT_SECRET", "help": "HS256 secret for bearer tokens"}
    )
    jwt_public_key: str = field(
        default="",
        metadata={"fallback": "JWT_PUBLIC_KEY", "help": "PEM public key (RS256/ES256) instead"},
    )
    jwt_audience: str = field(default="", metadata={"help": "required token audience, if any"})
    jwt_issuer: str = field(default="", metadata={"help": "required token issuer, if any"})
    export_url: str = field(
        default="http://127.0.0.1:8080",
        metadata={"help": "the export service's base URL, where cancels are forwarded"},
    )
    max_queue: int = field(
        default=1000,
        metadata={"help": "messages waiting for one client whose socket is full, before 4008"},
    )
    max_queue_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={"help": "bytes waiting for one client whose socket is full, before 4008"},
    )
    send_buffer: int = field(
        default=128 * 1024,
        metadata={
            "help": "kernel send buffer of each connection (bytes): bounds what a stalled "
            "client holds in the kernel, and how soon it counts as slow"
        },
    )
    page_size: int = field(
        default=200, metadata={"help": "events per replay read, and per export:replay frame"}
    )
    replay_cache_events: int = field(
        default=20_000,
        metadata={
            "help": "events of jobs last read for replays kept in memory, so that clients "
            "reconnecting at the same seq do not read and decode them again (0: none)"
        },
    )
    snapshot_jobs: int = field(
        default=200, metadata={"help": "job states at most in a project's status-sync"}
    )
    auth_timeout: float = field(
        default=10.0, metadata={"help": "seconds a new connection has to authenticate"}
    )
    max_subscriptions: int = field(
        default=100,
        metadata={"help": "streams (jobs, projects, the log) one connection may follow"},
    )
    max_connections_per_user: int = field(
        default=0,
        metadata={
            "help": "connections one user (the token's sub) may hold open to this process, "
            "beyond which a new one is closed with 4029; 0: no limit"
        },
    )
    max_message_bytes: int = field(
        default=4096, metadata={"help": "largest message a client may send (close 1009 beyond)"}
    )
    message_rate: float = field(
        default=20.0, metadata={"help": "messages per second a client may send, on average"}
    )
    message_burst: int = field(default=40, metadata={"help": "messages a client may send at once"})
    ping_interval: float = field(
        default=10.0, metadata={"help": "seconds between pings; a client silent for two is dropped"}
    )
    close_timeout: float = field(
        default=5.0,
        metadata={"help": "seconds a closing handshake may take (shutdown waits at most this)"},
    )
    heartbeat_interval: float = field(
        default=15.0,
        metadata={"help": "seconds between heartbeat messages a browser can watch for"},
    )
    gc_pacing: bool = field(
        default=True,
        metadata={
            "help": "full garbage collections after connections close, not each time the heap "
            "grows by a quarter (a reconnect storm would spend half its CPU in them)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_json: bool | None = field(
        default=None, metadata={"help": "JSON logs (default: when stderr is not a terminal)"}
    )
