"""Small hand-made result documents, shaped like what each benchmark writes to `<name>.json`
(only the keys the plots and the summary read, plus a few they must ignore)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SERVER = {"source": "test", "server_version": "16.4", "version": "PostgreSQL 16.4 on x86_64"}
MACHINE = {"cpu_count": 2, "python": "3.11.7"}


def _latency(p50: float, p99: float) -> dict[str, float]:
    return {"p50": p50, "p90": (p50 + p99) / 2, "p99": p99}


def appends(*, sweep: bool = True, group_commit: bool = True) -> dict[str, Any]:
    def figure(label: str, rate: float, p50: float, p99: float, baseline: str | None) -> Any:
        return {
            "label": label,
            "baseline": baseline,
            "events_per_s": rate,
            "latency_ms": _latency(p50, p99),
        }

    data: dict[str, Any] = {
        "benchmark": "appends",
        "started_at": "2026-11-24T10:00:00+00:00",
        "machine": MACHINE,
        "server": SERVER,
        "measurements": {
            "raw_insert_1": figure("raw INSERT autocommit, 1 conn", 2767.0, 0.3, 0.9, None),
            "append_one_1": figure("EventLog.append 1 event/tx, 1 writer", 720.0, 1.3, 3.0, None),
            "raw_insert_16": figure("raw INSERT autocommit, 16 conns", 7692.0, 2.0, 9.0, None),
            "append_one_16": figure(
                "EventLog.append 1 event/tx, 16 writers", 944.0, 15.9, 40.0, "raw_insert_16"
            ),
            "tail": figure("EventLog.tail, pages of 1,000", 197433.0, 5.0, 7.0, "raw_tail"),
        },
    }
    data["measurements"]["append_one_1"]["baseline"] = "raw_insert_1"
    if sweep:
        data["sweep"] = [
            {
                "jobs": 1,
                "events_per_s": 700.0,
                "p50_ms": 1.4,
                "p99_ms": 3.1,
                "raw_events_per_s": None,
            },
            {
                "jobs": 100,
                "events_per_s": 9000.0,
                "p50_ms": 9.0,
                "p99_ms": 15.0,
                "raw_events_per_s": 8000.0,
            },
            {
                "jobs": 1000,
                "events_per_s": 21000.0,
                "p50_ms": 12.0,
                "p99_ms": 18.5,
                "raw_events_per_s": 8100.0,
            },
        ]
    if group_commit:
        data["group_commit"] = {"events_per_s": 21000.0, "p99_ms": 18.5, "raw_events_per_s": 8100.0}
    return data


def fanout(*, replay: bool = True) -> dict[str, Any]:
    def rate(server: str, clients: int, value: float) -> dict[str, Any]:
        return {"server": server, "clients": clients, "jobs": 1, "deliveries_per_s": value}

    def latency(
        server: str, clients: int, per_job: int, rate: float, p50: float, p99: float
    ) -> dict[str, Any]:
        return {
            "server": server,
            "clients": clients,
            "clients_per_job": per_job,
            "target_events_per_s": rate,
            "latency_ms": _latency(p50, p99),
        }

    def memory(server: str, total: int, per: float) -> dict[str, Any]:
        return {
            "server": server,
            "connections_total": total,
            "bytes_per_connection": per * 1.1,
            "bytes_per_connection_total": per,
        }

    data: dict[str, Any] = {
        "benchmark": "fanout",
        "started_at": "2026-11-24T10:05:00+00:00",
        "machine": MACHINE,
        "server": SERVER,
        "fanout": [
            {
                "raw broadcast": rate("raw broadcast", clients, raw),
                "raw batched": rate("raw batched", clients, raw * 1.3),
                "gateway": rate("gateway", clients, gateway),
                "ratio": {"gateway / raw broadcast": gateway / raw},
            }
            for clients, raw, gateway in ((1000, 60000.0, 66000.0), (5000, 48000.0, 30000.0))
        ],
        "latency": [
            {
                "raw": latency("raw", 1000, 1, 2000, 0.2, 1.2),
                "gateway": latency("gateway", 1000, 1, 2000, 1.3, 7.8),
            },
            {
                "raw": latency("raw", 1000, 10, 2000, 0.5, 11.9),
                "gateway": latency("gateway", 1000, 10, 2000, 11.1, 61.4),
            },
        ],
        "fanout_latency": [
            {
                "raw": latency("raw", clients, clients, 2, p50, p50 * 2),
                "gateway": latency("gateway", clients, clients, 2, p50 * 1.5, p50 * 3),
            }
            for clients, p50 in ((1000, 20.0), (5000, 90.0))
        ],
        "storm": [
            {
                "server": "raw",
                "listen_backlog": 4096,
                "clients": 5000,
                "ready": 5000,
                "seconds_until_all_ready": 2.67,
            },
            {
                "server": "raw",
                "listen_backlog": 100,
                "clients": 5000,
                "ready": 5000,
                "seconds_until_all_ready": 7.1,
            },
            {
                "server": "gateway",
                "listen_backlog": 4096,
                "clients": 5000,
                "ready": 5000,
                "events_behind": 100,
                "seconds_until_all_ready": 3.9,
            },
        ],
        "memory": [
            {
                "connections": total,
                "raw": memory("raw", total, raw),
                "gateway": memory("gateway", total, gw),
            }
            for total, raw, gw in (
                (100, 13000.0, 16400.0),
                (1000, 14600.0, 18000.0),
                (5000, 15100.0, 18900.0),
            )
        ],
    }
    if replay:
        data["replay"] = [
            {
                "events": events,
                "median_s": seconds,
                "first_s": seconds * 2,
                "again_median_s": seconds,
                "min_s": seconds * 0.9,
                "max_s": seconds * 1.4,
                "raw_sql_median_s": seconds / 4,
            }
            for events, seconds in ((10, 0.0027), (100, 0.0031), (1000, 0.0122), (10000, 0.1008))
        ]
    return data


def socketio() -> dict[str, Any]:
    def side(
        server: str, rate: float, missed: int | None, p99: float | None, memory: float
    ) -> dict[str, Any]:
        return {
            "server": server,
            "clients": 1000,
            "deliveries_per_s": rate,
            "latency_ms": {"p50": 10.0, "p99": p99},
            "bytes_per_idle_connection": memory,
            "missed_after_gap": missed,
            "sent_during_gap_test": None if missed is None else 800,
        }

    return {
        "benchmark": "socketio",
        "started_at": "2026-11-24T10:08:00+00:00",
        "server": SERVER,
        "machine": MACHINE,
        "settings": {"gap_seconds": 1.0},
        "sides": {
            "raw websockets": side("raw websockets", 160000.0, None, None, 14393.0),
            "gateway": side("gateway", 151640.0, 0, 58.6, 14467.0),
            "python-socketio": side("python-socketio", 37995.0, 201, 85.2, 31396.0),
        },
        "gateway_vs_socketio": 3.99,
    }


def export() -> dict[str, Any]:
    return {
        "benchmark": "export",
        "started_at": "2026-11-24T10:10:00+00:00",
        "server": SERVER,
        "machine": MACHINE,
        "compression": {"median_seconds": 0.58, "files": 2112},
        "zip": {"median_seconds": 0.40},
        "compression_speed_over_zip": 0.69,
        "reporting": {
            "off": {"median_seconds": 2.50},
            "on": {"median_seconds": 2.55},
            "overhead_percent": 6.0,
            "paired_overhead_percent": 2.0,
        },
    }


ALL = {"appends": appends, "export": export, "fanout": fanout, "socketio": socketio}


def write_all(folder: Path, **documents: dict[str, Any]) -> Path:
    """Write each benchmark's document (the defaults above unless given) as `<name>.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in ALL.items():
        document = documents.get(name, make())
        (folder / f"{name}.json").write_text(json.dumps(document), encoding="utf-8")
    return folder
