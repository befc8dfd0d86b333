"""The gateway frames each live event once and writes those bytes to every client: they must be
the frame a WebSocket client reads back as the same text, at every size of length field."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from services.gateway.clients import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_a_frame_reads_back_as_the_same_text(size: int) -> None:
    payload = ("é" * size).encode()[:size].ljust(size, b"a")  # valid UTF-8 at every size
    client = Protocol(Side.CLIENT, max_size=None)
    # Two frames back to back, as a flush writes them: each is read whole, in order.
    client.receive_data(text_frame(payload) + text_frame(b'{"n":2}'))
    frames = client.events_received()
    assert [(f.opcode, f.fin, f.data) for f in frames if isinstance(f, Frame)] == [
        (Opcode.TEXT, True, payload),
        (Opcode.TEXT, True, b'{"n":2}'),
    ]
    assert client.state is State.OPEN  # a malformed frame would have started a close
