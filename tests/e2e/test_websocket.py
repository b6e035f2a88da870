"""WebSocket (HTTP/1.1 Upgrade) tunnelled both ways through the sidecar; client and server are
the `websockets` library."""

import contextlib
import json
import os

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from helpers import make_config


@pytest.fixture
def ws_url(ws_app, start_sidecar):
    sc = start_sidecar(make_config(ws_app.port, health_path=None))
    return f"ws://127.0.0.1:{sc.port('web')}/chat?room=1"


def _connect(url):
    return connect(url, proxy=None, open_timeout=5, close_timeout=5, max_size=8 << 20, compression=None)


def test_server_speaks_first_and_sees_the_handshake(ws_url):
    with _connect(ws_url) as ws:
        hello = json.loads(ws.recv(timeout=5))
    assert hello["hello"] == "ws"
    assert hello["path"] == "/chat?room=1"
    assert hello["x-forwarded-for"] and hello["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"


def test_text_and_binary_messages_echo_both_ways(ws_url):
    with _connect(ws_url) as ws:
        ws.recv(timeout=5)  # the greeting
        msgs = ["hello", "ünïcødé ✓", "", "x" * 70_000, os.urandom(1), os.urandom(100_000), b"", "last"]
        for m in msgs:
            ws.send(m)
            got = ws.recv(timeout=5)
            assert type(got) is type(m)
            assert got == m
        # several in flight at once
        for i in range(50):
            ws.send(f"burst {i}")
        assert [ws.recv(timeout=5) for _ in range(50)] == [f"burst {i}" for i in range(50)]


def test_client_close_is_acknowledged(ws_url):
    with _connect(ws_url) as ws:
        ws.recv(timeout=5)
        ws.send("ping")
        assert ws.recv(timeout=5) == "ping"
        ws.close(code=1000, reason="done")
    assert ws.protocol.close_rcvd is not None, "no close frame came back through the sidecar"
    assert ws.protocol.close_rcvd.code == 1000


def test_server_close_code_and_reason_reach_the_client(ws_url):
    with _connect(ws_url) as ws:
        ws.recv(timeout=5)
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=5)
    assert e.value.rcvd is not None
    assert e.value.rcvd.code == 4001
    assert e.value.rcvd.reason == "bye"


def test_many_websockets_at_once(ws_url):
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(_connect(ws_url)) for _ in range(20)]
        for c in conns:
            c.recv(timeout=5)
        for i, c in enumerate(conns):
            c.send(f"conn {i}")
        for i, c in enumerate(conns):
            assert c.recv(timeout=5) == f"conn {i}"
