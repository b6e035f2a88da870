"""Inbound `protocol: tcp`: opaque bytes both ways, server-speaks-first, half-close honoured."""

import os
import socket
import threading

import pytest

from helpers import free_port, make_config


@pytest.fixture
def db_port(tcp_app, http_app, start_sidecar):
    port = free_port()
    cfg = make_config(
        http_app.port,
        extra_inbound=[{"name": "db", "listen": f"127.0.0.1:{port}", "protocol": "tcp", "target": tcp_app.address}],
    )
    start_sidecar(cfg)
    return port


def _recv_until(sock, pred, limit=64 << 20):
    buf = b""
    while not pred(buf):
        d = sock.recv(1 << 20)
        if not d:
            break
        buf += d
        assert len(buf) <= limit
    return buf


def test_opaque_bytes_both_ways_and_half_close(db_port):
    data = bytes(range(256)) * 16 + os.urandom(3 << 20) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n\x00"
    s = socket.create_connection(("127.0.0.1", db_port), timeout=10)
    try:
        assert _recv_until(s, lambda b: b.endswith(b"\n")) == b"BANNER\n", "the app's first bytes did not come through"
        received = bytearray()

        def reader():
            while True:
                d = s.recv(1 << 20)
                if not d:
                    return
                received.extend(d)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # half-close: we are done sending, still reading
        t.join(15)
        assert not t.is_alive(), "no EOF from the sidecar after the app shut down its side"
    finally:
        s.close()
    final = f"FINAL {len(data)}\n".encode()
    assert bytes(received[: len(data)]) == data, "echoed bytes differ"
    assert bytes(received[len(data):]) == final, f"expected the app's final marker after half-close, got {bytes(received[len(data):])[:100]!r}"


def test_many_tcp_connections(db_port):
    socks = [socket.create_connection(("127.0.0.1", db_port), timeout=10) for _ in range(30)]
    try:
        for s in socks:
            assert _recv_until(s, lambda b: b.endswith(b"\n")) == b"BANNER\n"
        for i, s in enumerate(socks):
            s.sendall(f"conn-{i}|".encode())
        for i, s in enumerate(socks):
            want = f"conn-{i}|".encode()
            assert _recv_until(s, lambda b: len(b) >= len(want)) == want
        for s in socks:
            s.shutdown(socket.SHUT_WR)
        for i, s in enumerate(socks):
            assert _recv_until(s, lambda b: False) == f"FINAL {len(f'conn-{i}|')}\n".encode()
    finally:
        for s in socks:
            s.close()


def test_tcp_listener_with_app_down_closes_the_client(http_app, start_sidecar):
    port = free_port()
    cfg = make_config(http_app.port, extra_inbound=[{"name": "db", "listen": f"127.0.0.1:{port}", "protocol": "tcp", "target": f"127.0.0.1:{free_port()}"}])
    sc = start_sidecar(cfg)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            s.sendall(b"hello")
            assert s.recv(100) == b"", "bytes came back with no app behind the listener"
        except (ConnectionResetError, BrokenPipeError):
            pass
    finally:
        s.close()
    sc.assert_alive()


def test_idle_tcp_connection_is_closed_after_idle_timeout(tcp_app, http_app, start_sidecar):
    port = free_port()
    cfg = make_config(
        http_app.port,
        extra_inbound=[{
            "name": "db", "listen": f"127.0.0.1:{port}", "protocol": "tcp", "target": tcp_app.address,
            "limits": {"idle_timeout": "1s"},
        }],
    )
    start_sidecar(cfg)
    import time
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert _recv_until(s, lambda b: b.endswith(b"\n")) == b"BANNER\n"
        # Traffic every 0.5 s keeps the connection open past the timeout...
        for _ in range(4):
            s.sendall(b"ping\n")
            assert _recv_until(s, lambda b: b.endswith(b"ping\n")) == b"ping\n"
            time.sleep(0.5)
        # ...and silence closes it within two periods.
        start = time.monotonic()
        s.settimeout(5)
        assert s.recv(1) == b"", "the idle connection was not closed"
        assert time.monotonic() - start < 3.0
    finally:
        s.close()
