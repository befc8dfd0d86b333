"""The shared fold vectors (`tests/vectors/fold.json`): up to date, reached by Python's fold, and
for the histories marked `allowedByLog`, accepted by a real event log with the same state."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from schemas.events import EVENT_TYPES, decode_data, decode_event, encode_event
from schemas.state import JobState, replay
from services.common.eventlog import EventLog, NewEvent
from tests.vectors import generate

VECTORS: list[dict[str, Any]] = json.loads(generate.OUTPUT.read_text(encoding="utf-8"))
NAMES = [case["name"] for case in VECTORS]
BY_LOG = [case for case in VECTORS if case["allowedByLog"]]


def test_the_file_is_up_to_date() -> None:
    text = generate.render(generate.cases())
    assert text == generate.OUTPUT.read_text(encoding="utf-8"), (
        "tests/vectors/fold.json is stale: run `python -m tests.vectors.generate` and commit it"
    )


def test_names_are_unique_and_every_event_type_is_in_a_log_history() -> None:
    assert len(set(NAMES)) == len(NAMES)
    types = {event["type"] for case in BY_LOG for event in case["events"]}
    assert types >= set(EVENT_TYPES), sorted(set(EVENT_TYPES) - types)


@pytest.mark.parametrize("case", VECTORS, ids=NAMES)
def test_replay_gives_the_expected_state(case: dict[str, Any]) -> None:
    events = [generate.decode_envelope(e) for e in case["events"]]
    assert generate.encode_state(replay(events)) == case["expected"]
    # Resumed from the state after any prefix, as it travels in a status-sync.
    for k in range(len(events)):
        before = replay(events[:k])
        handed = None
        if before is not None:
            handed = msgspec.json.decode(msgspec.json.encode(before), type=JobState)
        assert generate.encode_state(replay(events[k:], handed)) == case["expected"], k


@pytest.mark.parametrize("case", VECTORS, ids=NAMES)
def test_typed_events_fold_the_same(case: dict[str, Any]) -> None:
    """Decoded up front (as the export service holds them), where every payload decodes."""
    try:
        events = [decode_event(json.dumps(e)) for e in case["events"]]
    except msgspec.ValidationError:
        assert not case["allowedByLog"]
        return
    assert generate.encode_state(replay(events)) == case["expected"]


async def test_log_histories_are_accepted_by_the_log(eventlog: EventLog) -> None:
    """Each `allowedByLog` history, appended event by event (a redelivered event once), is
    accepted; the log's projection is the expected state, and the log hands the events back in
    the very envelopes of the vectors (but for their positions)."""
    for case in BY_LOG:
        unique: dict[int, dict[str, Any]] = {}
        for envelope in case["events"]:
            unique.setdefault(envelope["seq"], envelope)
        envelopes = [unique[seq] for seq in sorted(unique)]
        assert [e["seq"] for e in envelopes] == list(range(1, len(envelopes) + 1))
        for envelope in envelopes:
            event = generate.decode_envelope(envelope)
            assert isinstance(event.data, msgspec.Raw)
            data = decode_data(event.type, event.data)
            assert not isinstance(data, msgspec.Raw)
            new = NewEvent(
                data=data,
                actor=event.actor,
                event_id=event.event_id,
                occurred_at=event.occurred_at,
            )
            await eventlog.append(
                event.job_id,
                event.seq - 1,
                [new],
                project_id=event.project_id,
                owner_id="ada",
            )
        job_id = generate.decode_envelope(envelopes[0]).job_id
        state = await eventlog.job_state(job_id)
        assert generate.encode_state(state) == case["expected"], case["name"]
        stored = [json.loads(encode_event(e)) for e in await eventlog.read_stream(job_id)]
        for envelope in [*stored, *envelopes]:
            envelope.pop("position")
        assert stored == envelopes, case["name"]
