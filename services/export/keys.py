"""The typed keys under which the export application shares its resources."""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg
from aiohttp import web

from services.common.auth import TokenVerifier
from services.common.eventlog import EventLog
from services.common.gcpacer import GcPacer
from services.common.notifier import Notifier
from services.common.web import HttpMetrics

from .config import ExportConfig
from .metrics import JobCounts
from .worker import Worker

if TYPE_CHECKING:
    from .streams import StreamHub

CONFIG = web.AppKey("config", ExportConfig)
POOL = web.AppKey("pool", asyncpg.Pool)
EVENTLOG = web.AppKey("eventlog", EventLog)
GC_PACER = web.AppKey("gc_pacer", GcPacer)
"""The process's schedule of full garbage collections, when the service runs one."""
JOB_COUNTS = web.AppKey("job_counts", JobCounts)
METRICS = web.AppKey("metrics", HttpMetrics)
NOTIFIER = web.AppKey("notifier", Notifier)
VERIFIER = web.AppKey("verifier", TokenVerifier)
WORKER = web.AppKey("worker", Worker)
STREAMS: web.AppKey[StreamHub] = web.AppKey("streams")
"""The process's one tailer for Server-Sent Events streams (streams.py imports these keys)."""
TASKS = web.AppKey("tasks", list)
"""The background tasks the app owns (notifier, worker); readiness fails if one has stopped."""
