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
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_json: bool | None = field(
        default=None, metadata={"help": "JSON logs (default: when stderr is not a terminal)"}
    )
