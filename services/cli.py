"""`exportlog`: run the whole stack for development, manage its database, verify jobs.

exportlog run                 PostgreSQL (embedded unless DATABASE_URL is set), migrations,
                              the export service and the gateway; Ctrl-C stops everything
exportlog db start|stop|url   the embedded PostgreSQL in the data folder
exportlog migrate             apply migrations to DATABASE_URL (or the embedded server)
exportlog verify JOB_ID       recompute a job's hash chain and name its first broken link
exportlog verify --from N     the same for every job in a range of log positions
exportlog start PROJECT       queue an export and show its progress (a running stack)
exportlog cancel PROJECT JOB  cancel an export and wait for it to stop
exportlog follow ...          print a job's, a project's or the log's events as they happen
exportlog history PROJECT     a project's exports, or (--job) one export's timeline
exportlog events --format csv events across jobs (filters as the history queries), to stdout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import aiohttp
import asyncpg
import msgspec

from schemas.events import AnnotationFormat
from services.common.auth import issue_token
from services.common.db import create_pool, migrate
from services.common.eventlog import EventLog
from services.common.logs import configure_logging
from services.common.settings import SettingsError, from_env
from services.export.demo import create_demo_project


@dataclass(frozen=True, slots=True)
class CliConfig:
    database_url: str = field(
        default="", metadata={"fallback": "DATABASE_URL", "help": "PostgreSQL DSN"}
    )
    data_dir: str = field(
        default=".data", metadata={"help": "where the embedded PostgreSQL keeps its cluster"}
    )
    export_port: int = field(default=8080, metadata={"help": "export service port for `run`"})
    gateway_port: int = field(default=8081, metadata={"help": "gateway port for `run`"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the services listen on"})
    url: str = field(
        default="http://127.0.0.1:8080", metadata={"help": "the export service, for commands"}
    )
    gateway_url: str = field(
        default="ws://127.0.0.1:8081/ws", metadata={"help": "the gateway, for commands"}
    )
    token: str = field(
        default="", metadata={"fallback": "TOKEN", "help": "bearer token for commands"}
    )


def _embedded(config: CliConfig):  # type: ignore[no-untyped-def]
    from services.common.embedded import EmbeddedPostgres

    return EmbeddedPostgres(Path(config.data_dir) / "pg")


def _database_url(config: CliConfig) -> tuple[str, object | None]:
    """The configured DSN, or the embedded server's (started if need be)."""
    if config.database_url:
        return config.database_url, None
    server = _embedded(config)
    return server.start(), server


async def _wait_ready(
    url: str, timeout: float, processes: Mapping[str, asyncio.subprocess.Process]
) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            for name, process in processes.items():
                if process.returncode is not None:
                    raise RuntimeError(f"the {name} exited with status {process.returncode}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout:.0f} s")
            await asyncio.sleep(0.1)


async def _stop(process: asyncio.subprocess.Process, timeout: float = 15) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


async def run_stack(config: CliConfig, environ: Mapping[str, str]) -> int:
    """Start the database, migrate, start both services, and wait for Ctrl-C."""
    dsn, server = _database_url(config)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        data = Path(config.data_dir)
        secret = _dev_secret(data)
        projects = data / "projects"
        await asyncio.to_thread(create_demo_project, projects, "demo")
        env = dict(environ)
        env.update(
            DATABASE_URL=dsn,
            EXPORT_HOST=config.host,
            EXPORT_PORT=str(config.export_port),
            EXPORT_MIGRATE="false",
            EXPORT_DATA_ROOT=str(projects),
            EXPORT_WORK_ROOT=str(data / "work"),
            EXPORT_ARCHIVE_ROOT=str(data / "archives"),
            GATEWAY_HOST=config.host,
            GATEWAY_PORT=str(config.gateway_port),
            GATEWAY_EXPORT_URL=f"http://{config.host}:{config.export_port}",
            EXPORT_GATEWAY_URL=f"ws://{config.host}:{config.gateway_port}/ws",
        )
        env.setdefault("JWT_SECRET", secret)
        token = issue_token(
            env["JWT_SECRET"], "dev", projects=["demo"], roles=["user"], ttl=7 * 24 * 3600
        )
        services = {
            "export service": await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.export", env=env
            ),
            "gateway": await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.gateway", env=env
            ),
        }
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            export_url = f"http://{config.host}:{config.export_port}"
            gateway_url = f"ws://{config.host}:{config.gateway_port}"
            await _wait_ready(f"{export_url}/readyz", 30, services)
            await _wait_ready(f"http://{config.host}:{config.gateway_port}/readyz", 30, services)
            where = (
                "embedded, in " + str(Path(config.data_dir) / "pg") if server else "DATABASE_URL"
            )
            defaults = CliConfig()
            cli_env = (
                ""
                if (config.export_port, config.gateway_port, config.host)
                == (defaults.export_port, defaults.gateway_port, defaults.host)
                else f" and EXPORTLOG_URL={export_url} EXPORTLOG_GATEWAY_URL={gateway_url}/ws"
            )
            print(
                f"\n  database        {_redact(dsn)}  ({where})\n"
                f"  export service  {export_url}   (health {export_url}/healthz, "
                f"metrics {export_url}/metrics)\n"
                f"  gateway         {gateway_url}/ws (health http://{config.host}:"
                f"{config.gateway_port}/healthz)\n"
                f"  demo page       {export_url}/demo/\n"
                f"  demo project    {projects / 'demo'}\n\n"
                f"  A token for user 'dev' on project 'demo' (valid 7 days):\n\n"
                f"    export TOKEN={token}\n\n"
                f"  Start an export and watch it:\n\n"
                f'    curl -s -X POST -H "Authorization: Bearer $TOKEN" '
                f"{export_url}/projects/demo/export\n"
                f'    curl -s -H "Authorization: Bearer $TOKEN" '
                f"{export_url}/projects/demo/export/<jobId>/status\n\n"
                f"  Or from another terminal, with the same TOKEN{cli_env}:\n\n"
                f"    .venv/bin/exportlog start demo\n"
                f"    .venv/bin/exportlog follow --project demo\n\n"
                f"  Ctrl-C stops everything.\n",
                flush=True,
            )
            exited = [asyncio.create_task(p.wait()) for p in services.values()]
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping, *exited], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in exited:
                task.cancel()
            for name, process in services.items():
                if process.returncode not in (None, 0):
                    print(f"{name} exited with status {process.returncode}", file=sys.stderr)
        finally:
            await asyncio.gather(*(_stop(p) for p in services.values()))
        return 0
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


def _dev_secret(data: Path) -> str:
    """The development signing secret: made once, kept in the data folder, never committed."""
    path = data / "dev-jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def _redact(dsn: str) -> str:
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"


async def _migrate(config: CliConfig) -> int:
    dsn, server = _database_url(config)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            applied = await migrate(conn)
        finally:
            await conn.close()
        print(f"applied {applied}" if applied else "already up to date")
        return 0
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


async def _verify(config: CliConfig, job_id: uuid.UUID) -> int:
    dsn, _server = _database_url(config)
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        report = await EventLog(pool).verify(job_id)
    finally:
        await pool.close()
    print(msgspec.json.format(msgspec.json.encode(report)).decode())
    if report.events_checked == 0:
        return 2
    return 0 if report.ok else 1


async def _verify_range(config: CliConfig, first: int, last: int | None) -> int:
    """Verify positions first..last (default: the head); exit 1 on a broken link."""
    dsn, _server = _database_url(config)
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        log = EventLog(pool)
        report = await log.verify_range(first, last if last is not None else 2**63 - 1)
    finally:
        await pool.close()
    print(msgspec.json.format(msgspec.json.encode(report)).decode())
    return 0 if report.ok else 1


def _run_verify(
    parser: argparse.ArgumentParser, config: CliConfig, args: argparse.Namespace
) -> int:
    if (args.job_id is None) == (args.first is None):
        parser.exit(2, "exportlog verify: give a JOB_ID, or --from N [--to M]\n")
    try:
        if args.job_id is not None:
            return asyncio.run(_verify(config, args.job_id))
        return asyncio.run(_verify_range(config, args.first, args.last))
    except ValueError as exc:
        parser.exit(2, f"exportlog verify: {exc}\n")
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"exportlog verify: the database did not answer: {exc}", file=sys.stderr)
        return 1


def _user_command(args: argparse.Namespace, config: CliConfig) -> int:
    from services import usercli

    if not config.token:
        print("exportlog: set EXPORTLOG_TOKEN (or TOKEN, as `make run` prints it)", file=sys.stderr)
        return usercli.EXIT_USAGE
    endpoints = usercli.Endpoints(config.url, config.gateway_url, config.token)
    out = sys.stdout
    if args.command == "start":
        options: dict[str, object] = {}
        if args.annotations:
            options["annotationFormats"] = args.annotations
        if args.no_images:
            options["includeOriginalImages"] = False
        if args.no_visualizations:
            options["includeVisualizations"] = False
        return usercli.run(usercli.start(endpoints, args.project, options, out))
    if args.command == "cancel":
        return usercli.run(usercli.cancel(endpoints, args.project, args.job_id, out))
    if args.command == "follow":
        return usercli.run(
            usercli.follow(
                endpoints,
                out,
                job_id=args.job,
                project_id=args.project,
                whole_log=args.log,
                after=args.after,
                consumer=args.consumer,
                as_json=args.json,
            )
        )
    if args.command == "events":
        filters = [("project", p) for p in args.project]
        filters += [("job", str(j)) for j in args.job]
        filters += [("type", t) for t in args.type] + [("actor", a) for a in args.actor]
        for name, value in (("occurredFrom", args.since), ("occurredTo", args.until)):
            if value:
                filters.append((name, value))
        if args.after is not None:
            filters.append(("after", str(args.after)))
        return usercli.run(usercli.export_events(endpoints, filters, args.format, out))
    return usercli.run(usercli.history(endpoints, args.project, args.job, out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="exportlog", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run PostgreSQL, the export service and the gateway")
    db = commands.add_parser("db", help="the embedded PostgreSQL")
    db.add_argument("action", choices=["start", "stop", "url"])
    commands.add_parser("migrate", help="apply migrations")
    verify = commands.add_parser(
        "verify", help="verify a job's hash chain, or (--from/--to) a range of the log"
    )
    verify.add_argument("job_id", type=uuid.UUID, nargs="?")
    verify.add_argument("--from", dest="first", type=int, help="first log position")
    verify.add_argument("--to", dest="last", type=int, help="last log position (default: head)")
    token = commands.add_parser(
        "token",
        help="print a token signed with the export service's secret (EXPORT_JWT_SECRET, else "
        "JWT_SECRET, else the development secret)",
    )
    token.add_argument("--user", default="dev")
    token.add_argument("--project", action="append", dest="projects", default=[])
    token.add_argument("--role", action="append", dest="roles", default=[])
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds")
    start = commands.add_parser("start", help="queue an export and show its progress")
    start.add_argument("project")
    start.add_argument(
        "--annotations",
        action="append",
        choices=list(get_args(AnnotationFormat)),
        help="annotation format (repeatable; default coco)",
    )
    start.add_argument("--no-images", action="store_true", help="leave the original images out")
    start.add_argument(
        "--no-visualizations", action="store_true", help="leave the annotated overlays out"
    )
    cancel = commands.add_parser("cancel", help="cancel an export and wait for it to stop")
    cancel.add_argument("project")
    cancel.add_argument("job_id", type=uuid.UUID)
    follow = commands.add_parser("follow", help="print events as they happen")
    stream = follow.add_mutually_exclusive_group(required=True)
    stream.add_argument("--job", type=uuid.UUID, help="one export's events (by seq)")
    stream.add_argument("--project", help="a project's events (by log position)")
    stream.add_argument("--log", action="store_true", help="the whole log (service, auditor)")
    follow.add_argument("--after", type=int, help="start after this seq / position")
    follow.add_argument("--consumer", help="a durable consumer: resume where it left off")
    follow.add_argument("--json", action="store_true", help="one JSON event per line")
    history = commands.add_parser("history", help="a project's exports or one export's events")
    history.add_argument("project")
    history.add_argument("--job", type=uuid.UUID, help="show this export's event timeline")
    events = commands.add_parser(
        "events", help="export events across jobs as NDJSON or CSV (history queries)"
    )
    events.add_argument("--project", action="append", default=[], help="repeatable")
    events.add_argument("--job", action="append", default=[], type=uuid.UUID, help="repeatable")
    events.add_argument("--type", action="append", default=[], help="e.g. export:failed")
    events.add_argument("--actor", action="append", default=[], help="e.g. user:dev")
    events.add_argument("--since", help="occurred at or after (RFC 3339)")
    events.add_argument("--until", help="occurred before (RFC 3339)")
    events.add_argument("--after", type=int, help="only events after this log position")
    events.add_argument("--format", choices=["ndjson", "csv"], default="ndjson")
    args = parser.parse_args(argv)

    try:
        config = from_env(CliConfig, "EXPORTLOG", os.environ)
    except SettingsError as exc:
        parser.exit(2, f"exportlog: {exc}\n")
    configure_logging("info")

    if args.command == "run":
        try:
            sys.exit(asyncio.run(run_stack(config, os.environ)))
        except (RuntimeError, TimeoutError) as exc:
            sys.exit(f"exportlog run: {exc}")
    if args.command == "db":
        server = _embedded(config)
        if args.action == "start":
            print(server.start())
        elif args.action == "stop":
            server.stop()
        else:
            print(server.url if server.is_running() else "not running")
        return
    if args.command == "migrate":
        sys.exit(asyncio.run(_migrate(config)))
    if args.command == "verify":
        sys.exit(_run_verify(parser, config, args))
    if args.command in ("start", "cancel", "follow", "history", "events"):
        sys.exit(_user_command(args, config))
    if args.command == "token":
        # The export service's own order: its prefixed variable, then the shared one.
        secret = (
            os.environ.get("EXPORT_JWT_SECRET")
            or os.environ.get("JWT_SECRET")
            or _dev_secret(Path(config.data_dir))
        )
        print(
            issue_token(
                secret,
                args.user,
                projects=args.projects or ["demo"],
                roles=args.roles or ["user"],
                ttl=args.ttl,
            )
        )


if __name__ == "__main__":
    main()
