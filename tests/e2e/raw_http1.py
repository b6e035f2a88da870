"""HTTP/1.1 over a raw TCP socket, for what http.client and curl will not send or will not
show: hostile requests, pipelining, keep-alive and close checks. Every read has a deadline.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from helpers import LOCALHOST, HeaderLookup, wait_closed


@dataclass
class RawResponse(HeaderLookup):
    status: int
    reason: str
    headers: list
    body: bytes


class ConnectionClosed(Exception):
    pass


class RawConn:
    """One TCP connection with a read buffer and an HTTP/1.1 response reader."""

    def __init__(self, port, timeout=10.0, host=LOCALHOST):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionClosed("peer closed the connection")
        self.buf += data

    def _read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> RawResponse:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.append((k.strip(), v.strip()))
        return RawResponse(status, parts[2] if len(parts) > 2 else "", headers, b"")

    def read_response(self, method="GET", skip_interim=True) -> RawResponse:
        while True:
            r = self.read_head()
            if not (skip_interim and 100 <= r.status < 200):
                break
        if method == "HEAD" or r.status in (204, 304):
            return r
        te = (r.header("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0].strip(), 16)
                if size == 0:
                    while self._read_until(b"\r\n") != b"\r\n":
                        pass
                    break
                body += self._read_exact(size)
                self._read_exact(2)
            r.body = body
        elif r.header("Content-Length") is not None:
            r.body = self._read_exact(int(r.header("Content-Length")))
        else:
            chunks = [self.buf]
            self.buf = b""
            while True:
                d = self.sock.recv(65536)
                if not d:
                    break
                chunks.append(d)
            r.body = b"".join(chunks)
        return r

    def request(self, path="/", method="GET", headers=(), body=b"") -> RawResponse:
        lines = [f"{method} {path} HTTP/1.1", "Host: e2e.test"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.read_response(method)

    def closed_within(self, timeout: float) -> bool:
        """True if the peer closes (EOF or reset) within timeout; data received is discarded."""
        return wait_closed(self.sock, timeout)[0]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def status_or_close(port, data: bytes, timeout=5.0):
    """Sends data on a fresh connection. Returns (status or None, closed_after, raw bytes):
    status of the first response (None if the connection ended with no response) and whether
    the sidecar closed the connection within timeout."""
    try:
        c = RawConn(port, timeout=timeout)
    except ConnectionRefusedError:
        return None, True, b""
    try:
        try:
            c.send(data)
        except OSError:
            return None, True, b""
        closed, raw, _ = wait_closed(c.sock, timeout)
        status = None
        if raw.startswith(b"HTTP/"):
            try:
                status = int(raw.split(b" ", 2)[1])
            except (IndexError, ValueError):
                status = None
        return status, closed, raw
    finally:
        c.close()
