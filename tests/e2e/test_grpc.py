"""gRPC through the sidecar (grpcio client and server, `app.http: http2`): unary, server
streaming, client streaming and bidi; status codes, details, initial and trailing metadata pass
through unchanged."""

import queue
import time

import grpc
import pytest

from helpers import make_config, wait_until

BIN_TRAILER = b"\x00\x01\xfe\xff"
OPTS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


@pytest.fixture
def grpc_env(grpc_app, grpc_stubs, start_sidecar):
    _, pb2, pb2_grpc = grpc_stubs
    # No health path: the readiness check is a TCP connect (grpcio does not serve GET /healthz).
    sc = start_sidecar(make_config(grpc_app.port, app_http="http2", health_path=None))
    channel = grpc.insecure_channel(f"127.0.0.1:{sc.port('web')}", options=OPTS)
    grpc.channel_ready_future(channel).result(timeout=5)
    yield sc, pb2, pb2_grpc.EchoStub(channel)
    channel.close()


def test_unary_with_metadata_and_trailers(grpc_env):
    sc, pb2, stub = grpc_env
    resp, call = stub.Unary.with_call(pb2.Msg(text="hi", payload=b"p" * 10), metadata=(("x-client", "abc"),), timeout=5)
    assert resp.text == "hi" and resp.count == 10
    assert call.code() == grpc.StatusCode.OK
    assert ("x-initial", "init-hi") in tuple(call.initial_metadata())
    trailers = dict(call.trailing_metadata())
    assert trailers.get("x-trailer") == "trail-hi"
    assert trailers.get("x-client-echo") == "abc", "request metadata did not reach the app"
    assert trailers.get("x-bin-bin") == BIN_TRAILER


def test_unary_large_message(grpc_env):
    _, pb2, stub = grpc_env
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    resp = stub.Unary(pb2.Msg(text="big", payload=payload), timeout=20)
    assert resp.payload == payload


def test_many_concurrent_unary_calls(grpc_env):
    _, pb2, stub = grpc_env
    futs = [stub.Unary.future(pb2.Msg(text=f"c{i}"), timeout=10) for i in range(100)]
    assert [f.result().text for f in futs] == [f"c{i}" for i in range(100)]


def test_server_streaming_arrives_as_sent(grpc_env):
    _, pb2, stub = grpc_env
    t0 = time.monotonic()
    call = stub.ServerStream(pb2.Msg(text="s", count=5, delay_ms=300), timeout=10)
    got, times = [], []
    for m in call:
        got.append((m.text, m.count))
        times.append(time.monotonic() - t0)
    assert got == [(f"s-{i}", i) for i in range(5)]
    assert times[0] < 1.0, f"first message after {times[0]:.2f}s"
    assert times[-1] - times[0] > 0.9, f"messages arrived together: {times}"
    assert call.code() == grpc.StatusCode.OK
    assert dict(call.trailing_metadata()).get("x-trailer") == "sent-5"


def test_client_streaming(grpc_env):
    _, pb2, stub = grpc_env

    def gen():
        for i in range(5):
            yield pb2.Msg(text=f"a{i}")
            time.sleep(0.05)

    resp, call = stub.ClientStream.with_call(gen(), timeout=10)
    assert resp.text == "a0,a1,a2,a3,a4" and resp.count == 5
    assert dict(call.trailing_metadata()).get("x-trailer") == "got-5"


def test_bidi_streaming_interleaved(grpc_env):
    """Each request is sent only after the previous answer arrived: proves both directions
    stream through the sidecar without waiting for the end of either."""
    _, pb2, stub = grpc_env
    q = queue.Queue()
    responses = stub.Bidi(iter(q.get, None), timeout=15)
    for i in range(5):
        q.put(pb2.Msg(text=f"m{i}", count=i))
        r = next(responses)
        assert (r.text, r.count) == (f"echo:m{i}", i)
    q.put(None)
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK
    assert dict(responses.trailing_metadata()).get("x-trailer") == "bidi-5"


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL],
)
def test_error_status_details_and_trailers_pass_through(grpc_env, code):
    _, pb2, stub = grpc_env
    details = f"no such thing: ü ✓ 100% {code.name}"
    with pytest.raises(grpc.RpcError) as e:
        stub.Fail(pb2.Msg(text=details, code=code.value[0]), timeout=5)
    err = e.value
    assert err.code() == code
    assert err.details() == details
    trailers = dict(err.trailing_metadata())
    assert trailers.get("x-reason") == "because-" + details[:8]
    assert trailers.get("x-bin-bin") == BIN_TRAILER


def test_grpc_requests_are_logged_and_counted(grpc_env):
    sc, pb2, stub = grpc_env
    before = sc.metrics().value("sidecar_inbound_requests_total", listener="web")
    for i in range(3):
        stub.Unary(pb2.Msg(text=f"m{i}"), timeout=5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and sc.metrics().value("sidecar_inbound_requests_total", listener="web") - before < 3:
        time.sleep(0.1)
    assert sc.metrics().value("sidecar_inbound_requests_total", listener="web") - before >= 3
    recs = wait_until(
        lambda: [r for r in sc.access_log() if str(r.get("path", "")).startswith("/e2e.Echo/Unary")][2:] and
        [r for r in sc.access_log() if str(r.get("path", "")).startswith("/e2e.Echo/Unary")],
        5,
        what="3 access-log records for /e2e.Echo/Unary",
    )
    assert recs[-1]["protocol"] == "HTTP/2" and recs[-1]["method"] == "POST"


def test_grpc_with_app_http_auto(grpc_app, grpc_stubs, start_sidecar):
    _, pb2, pb2_grpc = grpc_stubs
    sc = start_sidecar(make_config(grpc_app.port, app_http="auto", health_path=None))
    with grpc.insecure_channel(f"127.0.0.1:{sc.port('web')}", options=OPTS) as ch:
        resp, call = pb2_grpc.EchoStub(ch).Unary.with_call(pb2.Msg(text="auto"), timeout=5)
    assert resp.text == "auto"
    assert dict(call.trailing_metadata()).get("x-trailer") == "trail-auto"
