"""The config file: `sidecar check`, every error reported at once as `FILE: field.path: what`,
`sidecar run` refusing a bad file, and hot reload (file change and SIGHUP) that keeps
established connections and keeps the old config when the new one is invalid."""

import os
import re
import signal
import time

import yaml

from helpers import curl, free_port, http_request, make_config, run_sidecar_cmd, wait_until
from raw_http1 import RawConn

BAD_CONFIG = """\
admin:
  listen: 127.0.0.1:notaport
app:
  address: 127.0.0.1:8080
inbound:
  - name: web
    listen: 127.0.0.1:15006
    protocol: http
    limits:
      max_header_bytez: 16KiB
shutdown:
  drain_timeout: 5 parsecs
"""


def _error_lines(stderr: str, path, anchored=True) -> list[str]:
    """Lines of the form `FILE: field.path: what is wrong`; with anchored=False the line may
    carry a prefix (e.g. `sidecar: ` from `run`)."""
    if anchored:
        return [line for line in stderr.splitlines() if line.startswith(f"{path}: ")]
    return [line[line.index(f"{path}: "):] for line in stderr.splitlines() if f"{path}: " in line]


def _assert_reports_all_three(stderr: str, path, anchored=True):
    lines = _error_lines(stderr, path, anchored)
    assert lines, f"no line starts with '{path}: ' in stderr:\n{stderr}"
    joined = "\n".join(lines)
    assert re.search(rf"^{re.escape(str(path))}: admin\.listen: \S", joined, re.M), f"admin.listen not reported:\n{stderr}"
    assert re.search(rf"^{re.escape(str(path))}: shutdown\.drain_timeout: \S", joined, re.M), f"shutdown.drain_timeout not reported:\n{stderr}"
    typo = [line for line in lines if "max_header_bytez" in line]
    assert typo, f"the unknown field max_header_bytez is not reported:\n{stderr}"
    assert re.search(r"inbound(\[0\]|\.0)\.limits", typo[0]), f"the unknown field's path should name inbound[0].limits: {typo[0]}"


def test_check_accepts_a_valid_config(tmp_path, http_app):
    f = tmp_path / "ok.yaml"
    f.write_text(yaml.safe_dump(make_config(http_app.port)))
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 0, p.stderr


def test_check_accepts_the_smallest_config(tmp_path):
    f = tmp_path / "min.yaml"
    f.write_text(f"inbound:\n  - name: web\n    listen: 127.0.0.1:{free_port()}\n    protocol: http\n")
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 0, p.stderr


def test_check_reports_every_error_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD_CONFIG)
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1, (p.returncode, p.stderr)
    _assert_reports_all_three(p.stderr, f)


def test_check_rejects_bad_sizes_and_protocols(tmp_path):
    f = tmp_path / "bad2.yaml"
    f.write_text(
        "inbound:\n"
        "  - name: web\n    listen: 127.0.0.1:15006\n    protocol: htttp\n"
        "    limits: { max_header_bytes: 16 potatoes }\n"
    )
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1
    lines = "\n".join(_error_lines(p.stderr, f))
    assert re.search(r"inbound(\[0\]|\.0)\.protocol: ", lines), p.stderr
    assert re.search(r"inbound(\[0\]|\.0)\.limits\.max_header_bytes: ", lines), p.stderr


def test_check_missing_file(tmp_path):
    f = tmp_path / "nope.yaml"
    p = run_sidecar_cmd("check", "-c", f)
    assert p.returncode == 1
    assert str(f) in p.stderr


def test_run_refuses_a_bad_config_with_the_same_messages(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(BAD_CONFIG)
    p = run_sidecar_cmd("run", "-c", f, timeout=15)
    assert p.returncode != 0
    _assert_reports_all_three(p.stderr, f, anchored=False)


def test_run_takes_the_config_from_SIDECAR_CONFIG(tmp_path, http_app, start_sidecar):
    cfg = make_config(http_app.port)
    f = tmp_path / "env.yaml"
    f.write_text(yaml.safe_dump(cfg))
    sc = start_sidecar(cfg, args=["run"], env={"SIDECAR_CONFIG": str(f)}, config_path=f)
    assert curl(f"http://127.0.0.1:{sc.port('web')}/").status == 200


def _reloads(sc):
    m = sc.metrics()
    series = m.series("sidecar_config_reloads_total")
    err = sum(v for lab, v in series if lab.get("result") == "error")
    ok = sum(v for lab, v in series if lab.get("result") != "error")
    return ok, err


def _write_atomically(path, cfg):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    os.replace(tmp, path)


def _big_header_status(port):
    c = RawConn(port, timeout=5)
    try:
        return c.request("/", headers=[("X-Big", "h" * 8192)]).status
    finally:
        c.close()


def test_reload_on_file_change_keeps_connections(tmp_path, http_app, start_sidecar):
    path = tmp_path / "live.yaml"
    cfg = make_config(http_app.port)
    sc = start_sidecar(cfg, config_path=path)
    port = sc.port("web")
    ok0, err0 = _reloads(sc)

    kept = RawConn(port)
    assert kept.request("/?before").status == 200
    assert _big_header_status(port) == 200  # 8 KiB header under the 16 KiB limit

    web2 = free_port()
    new = make_config(http_app.port, web_port=port, admin_port=sc.admin_port, log_level="debug", limits={"max_header_bytes": "4KiB"})
    new["inbound"].append({"name": "web2", "listen": f"127.0.0.1:{web2}", "protocol": "http"})
    _write_atomically(path, new)
    try:
        wait_until(lambda: http_request(web2, "/", timeout=1).status == 200, 10, what="the new listener web2 to answer")
        r = kept.request("/?after")
        assert r.status == 200, "the established keep-alive connection broke across the reload"
    finally:
        kept.close()
    wait_until(lambda: _big_header_status(port) == 431, 5, what="the new 4KiB max_header_bytes to apply")
    assert "debug" in sc.admin("/log-level").body.decode().lower()
    ok1, err1 = _reloads(sc)
    assert ok1 > ok0 and err1 == err0, (ok0, err0, ok1, err1)
    sc.assert_alive()


def test_invalid_reload_keeps_the_old_config(tmp_path, http_app, start_sidecar):
    path = tmp_path / "live.yaml"
    cfg = make_config(http_app.port)
    sc = start_sidecar(cfg, config_path=path)
    port = sc.port("web")
    ok0, err0 = _reloads(sc)

    text = path.read_text().replace("drain_timeout: 5s", "drain_timeout: 5 parsecs")
    assert "parsecs" in text
    path.write_text(text + "bogus_field: 1\n")  # in place, as an editor would
    wait_until(lambda: _reloads(sc)[1] > err0, 10, what='sidecar_config_reloads_total{result="error"} to increase')
    assert curl(f"http://127.0.0.1:{port}/").status == 200
    assert sc.ready_status() == 200
    assert "parsecs" not in sc.admin("/config").body.decode()
    time.sleep(0.3)
    errs = sc.stderr_text()
    assert "drain_timeout" in errs and "bogus_field" in errs, f"the rejected reload's errors are not logged:\n{sc.stderr_tail()}"

    # A fixed file is picked up again.
    web2 = free_port()
    new = make_config(http_app.port, web_port=port, admin_port=sc.admin_port)
    new["inbound"].append({"name": "web2", "listen": f"127.0.0.1:{web2}", "protocol": "http"})
    _write_atomically(path, new)
    wait_until(lambda: http_request(web2, "/", timeout=1).status == 200, 10, what="web2 after fixing the file")
    assert _reloads(sc)[0] > ok0


def test_sighup_reloads(tmp_path, http_app, start_sidecar):
    path = tmp_path / "live.yaml"
    sc = start_sidecar(make_config(http_app.port), config_path=path)
    ok0, err0 = _reloads(sc)
    sc.proc.send_signal(signal.SIGHUP)  # the file is unchanged: only the signal can cause this reload
    wait_until(lambda: _reloads(sc)[0] > ok0, 5, what="a reload counted after SIGHUP")
    sc.assert_alive()
    assert curl(f"http://127.0.0.1:{sc.port('web')}/").status == 200

    # An invalid file (seen by the watcher or by this SIGHUP) counts an error and keeps serving.
    path.write_text(path.read_text() + "nonsense_key: true\n")
    time.sleep(0.2)
    sc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: _reloads(sc)[1] > err0, 10, what="an error reload")
    sc.assert_alive()
    assert curl(f"http://127.0.0.1:{sc.port('web')}/").status == 200
