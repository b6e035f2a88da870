"""`sidecar demo`: starts, prints URLs and ready-to-paste curl lines that work, the access log
and /metrics change as it is used, and Ctrl-C (SIGINT) exits 0."""

import json
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import SIDECAR_BIN, Metrics, die_with_parent, free_port, http_request, wait_until


def _curl_lines(text):
    out = []
    for line in text.splitlines():
        i = line.find("curl ")
        if i >= 0:
            out.append(line[i:].strip())
    return out


@pytest.mark.timeout(60)
def test_demo_prints_working_curl_lines_and_exits_0_on_ctrl_c(tmp_path):
    # The defaults are 127.0.0.1:15000 (admin), :15006 (proxy) and :18080 (app); free ports
    # here so the test runs beside anything else on the machine.
    ADMIN, PROXY, APP, OUT = free_port(), free_port(), free_port(), free_port()
    args = ["demo", "--admin", f"127.0.0.1:{ADMIN}", "--listen", f"127.0.0.1:{PROXY}", "--app", f"127.0.0.1:{APP}",
            "--outbound", f"127.0.0.1:{OUT}"]
    out_f, err_f = tmp_path / "demo.stdout", tmp_path / "demo.stderr"
    with open(out_f, "wb") as out, open(err_f, "wb") as err:
        p = subprocess.Popen([str(SIDECAR_BIN), *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    try:
        def output():
            return out_f.read_text(errors="replace") + "\n" + err_f.read_text(errors="replace")

        lines = wait_until(lambda: p.poll() is None and _curl_lines(output()), 20, what="curl lines from `sidecar demo`")
        assert p.poll() is None, f"demo exited with {p.returncode}:\n{output()}"
        text = output()
        assert "http://127.0.0.1:" in text or "https://127.0.0.1:" in text or "http://localhost:" in text, text
        wait_until(lambda: http_request(ADMIN, "/ready", timeout=1).status == 200, 10, what="demo /ready")

        def requests_total():
            return Metrics(http_request(ADMIN, "/metrics").body.decode()).value("sidecar_inbound_requests_total")

        def access_records():
            n = 0
            for line in output().splitlines():
                line = line.strip()
                if line.startswith("{"):
                    try:
                        n += "direction" in json.loads(line)
                    except json.JSONDecodeError:
                        pass
            return n

        before_metric, before_log = requests_total(), access_records()
        assert any(f":{PROXY}" in c for c in lines), f"curl lines do not use the --listen port {PROXY}: {lines}"
        runnable = [c for c in lines if f":{PROXY}" in c and not any(w in c.lower() for w in ("upgrade", "websocket", "slow"))]
        assert runnable, f"no plain curl line to run among: {lines}"
        saw_json = False
        for cmd in runnable[:3]:
            argv = shlex.split(cmd.split(" | ")[0])
            r = subprocess.run(argv + ["-sS", "--max-time", "5", "--noproxy", "*"], capture_output=True, timeout=10)
            assert r.returncode == 0, f"printed curl line failed: {cmd}\n{r.stderr.decode()}"
            body = r.stdout
            while body.startswith(b"HTTP/") and b"\r\n\r\n" in body:  # printed lines may use -i
                body = body.split(b"\r\n\r\n", 1)[1]
            try:
                doc = json.loads(body)
                saw_json = saw_json or isinstance(doc, dict)
            except json.JSONDecodeError:
                pass
        assert saw_json, f"none of {runnable[:3]} answered JSON"
        wait_until(lambda: access_records() > before_log, 5, what="an access-log line from the demo")
        wait_until(lambda: requests_total() > before_metric, 5, what="/metrics to count the demo requests")

        # The outbound listener the banner shows: one upstream fails every third request,
        # and retries hide it from the caller.
        assert any(f":{OUT}" in c for c in lines), f"no curl line uses the outbound port {OUT}: {lines}"
        statuses = [http_request(OUT, "/", timeout=5).status for _ in range(30)]
        assert statuses == [200] * 30, statuses
        m = Metrics(http_request(ADMIN, "/metrics").body.decode())
        assert m.value("sidecar_outbound_requests_total", upstream="orders", status_code="200") == 30
        assert m.value("sidecar_outbound_retries_total", upstream="orders") >= 1

        # Config-change notifications: the banner's directory changed, the app is told once.
        config_dir = re.search(r"echo hi > (\S+)/greeting", text).group(1)
        (Path(config_dir) / "greeting").write_text("hi from the test\n")
        told = lambda: http_request(APP, "/-/reload").body.decode()  # noqa: E731
        wait_until(lambda: told().startswith("told of 1 config change"), 10, what="the demo app told of the change")
        assert "greeting" in told()
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
            rc = None
    assert rc == 0, f"demo exit status after SIGINT: {rc}"


@pytest.mark.timeout(30)
def test_demo_app_alone_serves_logs_each_request_and_exits_0_on_sigterm(tmp_path):
    """`sidecar demo-app`: the image's app container. No sidecar in front: requests reach it
    directly, each is a JSON line in --log-file (whose directory it creates), and SIGTERM ends
    it with status 0."""
    port = free_port()
    log_file = tmp_path / "logs" / "app.log"
    err_f = tmp_path / "demo-app.stderr"
    with open(err_f, "wb") as err:
        p = subprocess.Popen([str(SIDECAR_BIN), "demo-app", "--listen", f"127.0.0.1:{port}", "--log-file", str(log_file)],
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=die_with_parent)
    try:
        wait_until(lambda: http_request(port, "/healthz", timeout=1).status == 200, 10, what="demo-app /healthz")
        r = http_request(port, "/")
        assert r.status == 200 and r.json()["message"] == "hello from the demo app", r.body
        assert r.json()["forwarded_for"] is None, "nothing is in front of the demo app"
        assert http_request(port, "/status/503").status == 503
        lines = wait_until(lambda: [json.loads(line) for line in log_file.read_text().splitlines()], 5, what="log lines")
        assert [(rec["path"], rec["status"], rec["level"]) for rec in lines] == [("/", 200, "info"), ("/status/503", 503, "error")]
        assert f"127.0.0.1:{port}" in err_f.read_text()
        p.send_signal(signal.SIGTERM)
        assert p.wait(5) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_demo_app_names_a_log_file_it_cannot_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = subprocess.run([str(SIDECAR_BIN), "demo-app", "--listen", f"127.0.0.1:{free_port()}", "--log-file", str(blocker / "app.log")],
                       capture_output=True, text=True, timeout=10)
    assert p.returncode == 1
    assert str(blocker / "app.log") in p.stderr and "demo app" in p.stderr, p.stderr
