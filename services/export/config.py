"""The export service's settings: EXPORT_* environment variables, read once in __main__."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ExportConfig:
    database_url: str = field(
        default="", metadata={"fallback": "DATABASE_URL", "help": "PostgreSQL DSN"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8080, metadata={"help": "HTTP port (0 picks a free one)"})
    migrate: bool = field(default=True, metadata={"help": "apply migrations at start-up"})
    pool_min: int = field(default=2, metadata={"help": "database connections kept open"})
    pool_max: int = field(default=16, metadata={"help": "database connections at most"})
    notify: str = field(
        default="after-commit",
        metadata={
            "help": "how appends wake readers: after-commit (one coalesced NOTIFY from a "
            "connection of its own) or transaction (a NOTIFY inside each append)"
        },
    )
    append_batch_max: int = field(
        default=500,
        metadata={
            "help": "group commit: appends of different jobs written in one transaction at "
            "most; 0 writes each append in a transaction of its own"
        },
    )
    append_in_flight: int = field(
        default=4, metadata={"help": "group commit: append transactions under way at once"}
    )
    append_min_alongside: int = field(
        default=32,
        metadata={
            "help": "group commit: appends that must be waiting to start a transaction while "
            "another is under way (fewer leave together when it ends)"
        },
    )
    append_max_wait: float = field(
        default=0.01,
        metadata={
            "help": "group commit: seconds the oldest waiting append waits for a transaction "
            "under way before it starts one of its own all the same"
        },
    )
    metrics_interval: float = field(
        default=5.0,
        metadata={"help": "seconds between counts of unfinished jobs for /metrics (export_jobs)"},
    )
    jwt_secret: str = field(
        default="", metadata={"fallback": "JWT_SECRET", "help": "HS256 secret for bearer tokens"}
    )
    jwt_public_key: str = field(
        default="",
        metadata={"fallback": "JWT_PUBLIC_KEY", "help": "PEM public key (RS256/ES256) instead"},
    )
    jwt_audience: str = field(default="", metadata={"help": "required token audience, if any"})
    jwt_issuer: str = field(default="", metadata={"help": "required token issuer, if any"})
    data_root: str = field(
        default="data/projects", metadata={"help": "folder holding one folder per project"}
    )
    work_root: str = field(
        default="data/work", metadata={"help": "scratch space of running exports"}
    )
    archive_root: str = field(
        default="data/archives", metadata={"help": "finished archives, served for download"}
    )
    archive_retention: str = field(
        default="7d",
        metadata={
            "help": "how long an archive stays downloadable after its export completed: "
            "seconds, or a duration such as 90m, 36h, 7d; 0 or empty keeps archives forever"
        },
    )
    retention_interval: float = field(
        default=300.0, metadata={"help": "seconds between sweeps for expired archives"}
    )
    retention_batch: int = field(
        default=100, metadata={"help": "archives expired per transaction by a sweep"}
    )
    workers: int = field(default=2, metadata={"help": "exports run at once by this process"})
    per_user_limit: int = field(
        default=2, metadata={"help": "exports of one user running at once, across processes"}
    )
    lease_seconds: float = field(
        default=15.0, metadata={"help": "a worker silent this long loses its job to another"}
    )
    max_attempts: int = field(
        default=3, metadata={"help": "claims of a job before it fails as worker_lost"}
    )
    poll_interval: float = field(
        default=2.0, metadata={"help": "seconds between looks for work without a NOTIFY"}
    )
    worker_id: str = field(
        default="", metadata={"help": "name of this process in events (default host:pid)"}
    )
    audit_page_size: int = field(
        default=1000,
        metadata={"help": "events per database read when streaming history or verifying ranges"},
    )
    web_root: str = field(
        default="",
        metadata={
            "help": "folder served at /demo/ (default: the web/ folder installed with the "
            "package, or the checkout's web/)"
        },
    )
    gateway_url: str = field(
        default="ws://127.0.0.1:8081/ws",
        metadata={
            "help": "the gateway's WebSocket URL, told to the demo page by /demo/config.json"
        },
    )
    gc_pacing: bool = field(
        default=True,
        metadata={
            "help": "full garbage collections once a minute, not each time the heap grows by a "
            "quarter (under a steady load of appends that was every few seconds, and each one "
            "held the appends up)"
        },
    )
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_json: bool | None = field(
        default=None, metadata={"help": "JSON logs (default: when stderr is not a terminal)"}
    )
