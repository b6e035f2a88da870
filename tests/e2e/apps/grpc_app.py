#!/usr/bin/env python3
"""gRPC application (grpcio) for Sidecar's end-to-end tests; speaks HTTP/2 only.

Usage: grpc_app.py --stubs DIR   (DIR holds echo_pb2.py and echo_pb2_grpc.py generated from
echo.proto). Prints `PORT <n>` once listening.
"""

import argparse
import sys
import time
from concurrent import futures

import grpc

BIN_TRAILER = b"\x00\x01\xfe\xff"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--stubs", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.stubs)
    import echo_pb2
    import echo_pb2_grpc

    class Echo(echo_pb2_grpc.EchoServicer):
        def Unary(self, req, ctx):
            md = dict(ctx.invocation_metadata())
            ctx.send_initial_metadata((("x-initial", "init-" + req.text),))
            ctx.set_trailing_metadata(
                (
                    ("x-trailer", "trail-" + req.text),
                    ("x-client-echo", md.get("x-client", "")),
                    ("x-bin-bin", BIN_TRAILER),
                )
            )
            return echo_pb2.Msg(text=req.text, count=len(req.payload), payload=req.payload)

        def ServerStream(self, req, ctx):
            for i in range(req.count):
                if i and req.delay_ms:
                    time.sleep(req.delay_ms / 1000)
                yield echo_pb2.Msg(text=f"{req.text}-{i}", count=i)
            ctx.set_trailing_metadata((("x-trailer", f"sent-{req.count}"),))

        def ClientStream(self, it, ctx):
            texts = [m.text for m in it]
            ctx.set_trailing_metadata((("x-trailer", f"got-{len(texts)}"),))
            return echo_pb2.Msg(text=",".join(texts), count=len(texts))

        def Bidi(self, it, ctx):
            n = 0
            for m in it:
                n += 1
                yield echo_pb2.Msg(text="echo:" + m.text, count=m.count)
            ctx.set_trailing_metadata((("x-trailer", f"bidi-{n}"),))

        def Fail(self, req, ctx):
            code = next(c for c in grpc.StatusCode if c.value[0] == req.code)
            ctx.set_trailing_metadata((("x-reason", "because-" + req.text[:8]), ("x-bin-bin", BIN_TRAILER)))
            ctx.abort(code, req.text)

    opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=opts)
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
