"""HTTP/2 test clients: `H2Client` (the `h2` library, cleartext prior knowledge) and `RawH2`
(frames written by hand, for what the library will not do: read on after a GOAWAY, send
floods), over one shared frame reader. Every read has a deadline.
"""

from __future__ import annotations

import socket
import time

from helpers import LOCALHOST


class _FrameReader:
    """Socket reads cut into whole HTTP/2 frames, and closing, for every HTTP/2 test client.
    Expects `self.sock`, `self.closed` (False, or why the connection ended) and `self._inbuf`."""

    def _read_frames(self, timeout, size):
        """Reads once (up to timeout). None: the connection is closed (`self.closed` says why);
        else the complete frames now buffered (each with its 9-byte header), possibly none."""
        if self.closed:
            return None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(size)
        except socket.timeout:
            return []
        except OSError as e:
            self.closed = f"recv: {e!r}"
            return None
        if not data:
            self.closed = "EOF"
            return None
        self._inbuf += data
        frames = []
        while len(self._inbuf) >= 9:
            n = 9 + int.from_bytes(self._inbuf[:3], "big")
            if len(self._inbuf) < n:
                break
            frames.append(self._inbuf[:n])
            self._inbuf = self._inbuf[n:]
        return frames

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class H2Client(_FrameReader):
    """A cleartext (prior knowledge) HTTP/2 client connection, frame-level, for tests."""

    def __init__(self, port, timeout=10.0):
        import h2.config
        import h2.connection

        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.flush()
        self.streams: dict[int, dict] = {}
        self.terminated = []  # ConnectionTerminated events (GOAWAY received)
        self.closed = False  # why the connection ended (EOF, reset, protocol error), or False
        self.events = []
        self._inbuf = b""

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path, method="GET", body=b"", headers=(), port_authority="e2e.test"):
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":path", path), (":scheme", "http"), (":authority", port_authority), *headers]
        self.conn.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.conn.send_data(sid, body, end_stream=True)
        self.streams[sid] = {"status": None, "headers": [], "body": b"", "ended": False, "reset": None, "trailers": []}
        self.flush()
        return sid

    def pump(self, timeout=0.5):
        """Reads once (up to timeout) and handles the events. Returns False once closed."""
        import h2.events
        import h2.exceptions

        frames = self._read_frames(timeout, 1 << 20)
        if frames is None:
            return False
        # Feed whole frames one at a time: the h2 library raises on any frame after a GOAWAY
        # (e.g. the PING hyper sends with it), and an exception would lose the events before it.
        events = []
        for frame in frames:
            if self.terminated:
                continue  # the library's connection is closed; nothing more it can parse
            try:
                events.extend(self.conn.receive_data(frame))
            except h2.exceptions.ProtocolError as e:
                self.closed = f"h2 protocol error: {e!r}"
                break
        for ev in events:
            self.events.append(ev)
            st = self.streams.get(getattr(ev, "stream_id", None) or -1)
            if isinstance(ev, h2.events.ResponseReceived) and st is not None:
                st["headers"] = ev.headers
                st["status"] = int(dict(ev.headers)[":status"])
            elif isinstance(ev, h2.events.DataReceived):
                if st is not None:
                    st["body"] += ev.data
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except h2.exceptions.H2Error:
                    pass
            elif isinstance(ev, h2.events.TrailersReceived) and st is not None:
                st["trailers"] = ev.headers
            elif isinstance(ev, h2.events.StreamEnded) and st is not None:
                st["ended"] = True
            elif isinstance(ev, h2.events.StreamReset) and st is not None:
                st["reset"] = ev.error_code
                st["ended"] = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.terminated.append(ev)
        try:
            self.flush()
        except OSError as e:
            self.closed = f"send: {e!r}"
        return not self.closed

    def wait(self, stream_ids, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.streams[s]["ended"] for s in stream_ids):
                break
            if not self.pump(0.2):
                break
        return {s: self.streams[s] for s in stream_ids}


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + stream_id.to_bytes(4, "big") + payload


class RawH2(_FrameReader):
    """A minimal frame-level HTTP/2 client (hpack for header blocks). Unlike the h2 library it
    keeps reading streams after a GOAWAY, which is what a graceful drain looks like: GOAWAY, then
    the in-flight streams finish. It ACKs SETTINGS and PING like a real client."""

    def __init__(self, port, timeout=10.0):
        import hpack

        self.sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self._inbuf = b""
        self.goaways = []  # (last_stream_id, error_code)
        self.closed = False
        self.streams: dict[int, dict] = {}
        # ACK the server's SETTINGS and PINGs (what a real client does). A test that writes
        # the socket from another thread turns this off, so two writers never interleave.
        self.answer = True
        self.settings_seen = False  # the server's first SETTINGS arrived
        self.sock.sendall(H2_PREFACE + h2_frame(4, 0, 0))

    def request(self, stream_id, path, method="GET"):
        block = self.enc.encode([(":method", method), (":path", path), (":scheme", "http"), (":authority", "e2e.test")])
        self.streams[stream_id] = {"status": None, "body": b"", "ended": False, "reset": None}
        self.sock.sendall(h2_frame(1, 0x4 | 0x1, stream_id, block))  # END_HEADERS | END_STREAM

    def pump(self, timeout=0.2):
        frames = self._read_frames(timeout, 65536)
        if frames is None:
            return False
        for frame in frames:
            ftype, flags, sid = frame[3], frame[4], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            payload = frame[9:]
            st = self.streams.get(sid)
            try:
                if ftype == 4 and not flags & 0x1:  # SETTINGS
                    self.settings_seen = True
                    if self.answer:
                        self.sock.sendall(h2_frame(4, 0x1, 0))
                elif ftype == 6 and not flags & 0x1:  # PING
                    if self.answer:
                        self.sock.sendall(h2_frame(6, 0x1, 0, payload))
                elif ftype == 7:  # GOAWAY
                    self.goaways.append((int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, int.from_bytes(payload[4:8], "big")))
                elif ftype == 1 and st is not None:  # HEADERS (hyper sends neither padding nor priority)
                    hdrs = dict(self.dec.decode(payload))
                    if ":status" in hdrs:
                        st["status"] = int(hdrs[":status"])
                    st["ended"] = st["ended"] or bool(flags & 0x1)
                elif ftype == 0 and st is not None:  # DATA
                    st["body"] += payload
                    st["ended"] = st["ended"] or bool(flags & 0x1)
                    if payload:
                        self.sock.sendall(h2_frame(8, 0, 0, len(payload).to_bytes(4, "big")))
                elif ftype == 3 and st is not None:  # RST_STREAM
                    st["reset"] = int.from_bytes(payload[:4], "big")
                    st["ended"] = True
            except OSError:
                pass
        return True
