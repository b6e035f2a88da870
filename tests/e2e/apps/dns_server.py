#!/usr/bin/env python3
"""A tiny authoritative DNS server (dnslib) for the outbound tests, on UDP and TCP port 53 of
one loopback address (`--host 127.53.x.y`; binding port 53 needs root). Prints `PORT 53` once
it listens.

The answers come from a JSON file read again on every query, so a test changes them by
rewriting it: {"name.test": {"a": ["127.0.0.21", ...], "ttl": 1}}. A name in the file gets its
A records (AAAA and other types: no data); any other name gets NXDOMAIN. Each query is
counted in the file's sibling `<zone>.queries` (one line per query: `name type`).
"""

import argparse
import json
import sys
import threading
import time

from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):
    def __init__(self, zone_path):
        self.zone_path = zone_path
        self.lock = threading.Lock()

    def zone(self):
        try:
            with open(self.zone_path) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            return {}
        return {k.lower().rstrip("."): v for k, v in raw.items()}

    def resolve(self, request, handler):
        reply = request.reply()
        q = request.q
        name = str(q.qname).lower().rstrip(".")
        with self.lock, open(self.zone_path + ".queries", "a") as log:
            log.write(f"{name} {QTYPE[q.qtype]}\n")
        entry = self.zone().get(name)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if q.qtype in (QTYPE.A, QTYPE.ANY):
            for ip in entry.get("a", []):
                reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(ip), ttl=int(entry.get("ttl", 1))))
        return reply


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--zone", required=True)
    args = ap.parse_args()
    resolver = ZoneResolver(args.zone)
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = [DNSServer(resolver, port=53, address=args.host, tcp=tcp, logger=quiet) for tcp in (False, True)]
    for s in servers:
        s.start_thread()
    print("PORT 53", flush=True)
    while all(s.isAlive() for s in servers):
        time.sleep(0.5)
    return 1


if __name__ == "__main__":
    sys.exit(main())
