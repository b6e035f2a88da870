"""The app on a Unix domain socket (`app.address: unix:/path`, `inbound[].target: unix:/path`).

An app in the same pod can listen on a socket in a shared volume and skip the TCP stack both
ways. The sidecar dials it for HTTP/1.1 and HTTP/2 clients, health-checks it over the socket,
forwards `protocol: tcp` listeners to it, and treats a socket with nobody behind it like a
refused TCP connect (502, the app unready) until the app comes back.
"""

import socket
import threading

import yaml

from helpers import AppProcess, curl, free_port, http_request, make_config, run_sidecar_cmd, wait_until


def _unix_app(log_dir, path):
    return AppProcess("http_app.py", "--unix", path, log_dir=log_dir)


def _unix_config(path):
    cfg = make_config(0)
    cfg["app"]["address"] = f"unix:{path}"
    return cfg


def test_http1_and_http2_clients_reach_an_app_on_a_unix_socket(log_dir, tmp_path, start_sidecar):
    sock = tmp_path / "app.sock"
    app = _unix_app(log_dir, sock)
    try:
        sc = start_sidecar(_unix_config(sock))  # waits for /ready: the health check went over the socket
        url = f"http://127.0.0.1:{sc.port()}/headers"
        r = curl("-s", url)
        assert r.status == 200, r
        assert b'"host", "127.0.0.1:' in r.body, r.body
        r2 = curl("-s", "--http2-prior-knowledge", f"http://127.0.0.1:{sc.port()}/big?bytes=300000")
        assert r2.status == 200 and len(r2.body) == 300000, (r2.status, len(r2.body))
        up = curl("-s", "-X", "POST", "--data-binary", "@-", f"http://127.0.0.1:{sc.port()}/upload", input=b"u" * 1_000_000)
        assert up.status == 200 and b'"bytes": 1000000' in up.body, up
        # HTTP/1.0 without Host: the app still gets a Host, the socket's `localhost`.
        s = socket.create_connection(("127.0.0.1", sc.port()), timeout=5)
        s.sendall(b"GET /headers HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        s.close()
        assert raw.startswith(b"HTTP/1.0 200"), raw[:100]
        assert b'"host", "localhost"' in raw, raw
        assert yaml.safe_load(sc.admin("/config").body)["app"]["address"] == f"unix:{sock}"
        assert sc.wait_access_log(lambda rec: rec.get("protocol") == "HTTP/1.0")[-1]["status"] == 200
    finally:
        app.stop()


def test_a_missing_socket_is_a_refused_connect_until_the_app_is_back(log_dir, tmp_path, start_sidecar):
    sock = tmp_path / "app.sock"
    sc = start_sidecar(_unix_config(sock), wait="live")
    r = http_request(sc.port(), "/")
    assert r.status == 502, r.status
    assert sc.admin("/ready").status == 503
    assert sc.wait_access_log()[-1]["error"] == "app_connection_refused"
    app = _unix_app(log_dir, sock)
    try:
        wait_until(lambda: sc.admin("/ready").status == 200, 10, what="ready once the app listens")
        assert http_request(sc.port(), "/").status == 200
    finally:
        app.stop()


def test_a_tcp_listener_forwards_to_a_unix_socket(log_dir, tmp_path, start_sidecar):
    sock_path = str(tmp_path / "echo.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)

    def echo():
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    app = _unix_app(log_dir, tmp_path / "app.sock")
    try:
        cfg = _unix_config(tmp_path / "app.sock")
        cfg["inbound"].append({"name": "db", "listen": f"127.0.0.1:{free_port()}", "protocol": "tcp", "target": f"unix:{sock_path}"})
        sc = start_sidecar(cfg)
        c = socket.create_connection(("127.0.0.1", sc.port("db")), timeout=5)
        payload = bytes(range(256)) * 1024
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
        c.close()
        assert got == payload
    finally:
        app.stop()
        srv.close()


def test_check_names_a_bad_unix_address(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "app: { address: 'unix:app.sock' }\n"
        "inbound:\n"
        "  - { name: web, listen: 127.0.0.1:15006 }\n"
        f"  - {{ name: db, listen: 127.0.0.1:15007, protocol: tcp, target: 'unix:/{'x' * 200}' }}\n"
    )
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1, p
    assert f"{f}: app.address: `unix:app.sock`: a Unix socket path must be absolute" in p.stderr, p.stderr
    assert f"{f}: inbound[1].target: " in p.stderr and "at most 107 bytes" in p.stderr, p.stderr
