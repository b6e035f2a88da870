"""Connection limits across config reloads (issue 9, bug 1): a reload, even of an unrelated
setting, must not hand a listener a fresh `max_connections` while the connections it already
holds keep their slots; lowering the limit applies to the connections already open."""

import time

from helpers import make_config, reload_config, wait_until
from raw_http1 import RawConn, status_or_close

REJ = "sidecar_inbound_rejected_total"


def _cfg(app_port, max_connections, log_level="info", web_port=None, admin_port=None):
    # A long header_read_timeout: the held connections must not be cut while the test waits
    # for a reload.
    return make_config(
        app_port,
        limits={"max_connections": max_connections, "header_read_timeout": "30s", "idle_timeout": "60s"},
        log_level=log_level,
        web_port=web_port,
        admin_port=admin_port,
    )


def _held(port, n):
    """n keep-alive connections, each having carried one request (so each holds a slot)."""
    conns = []
    for i in range(n):
        c = RawConn(port, timeout=5)
        conns.append(c)
        assert c.request(f"/?held={i}").status == 200
    return conns


def _rejected(sc):
    return sc.rejected("web").get("max_connections", 0)


def _assert_refused_at_once(sc, port):
    """A new connection is closed by the sidecar at once (EOF or reset, no answer to its
    request) and counted once under reason="max_connections"."""
    rej0 = _rejected(sc)
    t0 = time.monotonic()
    status, closed, raw = status_or_close(port, b"GET /?over-the-limit HTTP/1.1\r\nHost: e2e.test\r\n\r\n", timeout=2)
    took = time.monotonic() - t0
    assert closed and status is None and raw == b"", (
        f"a connection over max_connections was not refused: status {status}, closed {closed}, got {raw[:120]!r}"
    )
    assert took < 1.0, f"the refused connection took {took:.2f}s to be closed"
    wait_until(lambda: _rejected(sc) - rej0 >= 1, 3, what=f'{REJ}{{listener="web",reason="max_connections"}} to grow')
    time.sleep(0.2)
    assert _rejected(sc) - rej0 == 1, f"one refused connection counted {_rejected(sc) - rej0} times"


def _served(port) -> bool:
    c = RawConn(port, timeout=2)
    try:
        return c.request("/?new").status == 200
    except OSError:
        return False
    finally:
        c.close()


def test_reload_keeps_max_connections(http_app, start_sidecar):
    sc = start_sidecar(_cfg(http_app.port, 2))
    port = sc.port("web")
    held = _held(port, 2)
    try:
        _assert_refused_at_once(sc, port)  # the limit holds before any reload
        # Only the log level changes: the listener, its limits and the held connections stay.
        reload_config(sc, _cfg(http_app.port, 2, log_level="debug", web_port=port, admin_port=sc.admin_port))
        assert "debug" in sc.admin("/log-level").body.decode().lower(), "the reload did not apply"
        _assert_refused_at_once(sc, port)
        for c in held:
            assert c.request("/?still-held").status == 200, "a held connection broke across the reload"
        held.pop().close()
        wait_until(lambda: _served(port), 3, what="a new connection to be served once a slot is free")
    finally:
        for c in held:
            c.close()
    sc.assert_alive()


def test_reload_lowering_max_connections_counts_open_connections(http_app, start_sidecar):
    sc = start_sidecar(_cfg(http_app.port, 3))
    port = sc.port("web")
    held = _held(port, 2)
    try:
        reload_config(sc, _cfg(http_app.port, 2, web_port=port, admin_port=sc.admin_port))
        _assert_refused_at_once(sc, port)
        for c in held:
            assert c.request("/?still-held").status == 200
    finally:
        for c in held:
            c.close()
    wait_until(lambda: _served(port), 3, what="a new connection to be served once the held ones closed")
