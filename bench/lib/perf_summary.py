#!/usr/bin/env python3
"""Summarise a `perf record -g` of Sidecar: self time grouped by where it goes, and the inclusive
share of the functions that matter for CPU per request.

usage: perf_summary.py PERF_DATA
"""
import re
import subprocess
import sys

GROUPS = [  # (group, regex on "dso symbol"), first match wins
    ("kernel: syscall entry/exit", r"\[k\] (entry_SYSCALL|do_syscall_64|syscall_exit|__x64_sys|exit_to_user|syscall_return|__fdget|fdget|fput|__fget)"),
    ("kernel: epoll", r"\[k\] (ep_|__ep_|do_epoll|__x64_sys_epoll)"),
    ("kernel: scheduler/timers", r"\[k\] (schedule|__schedule|finish_task_switch|hrtimer|pick_next|update_|try_to_wake|enqueue|dequeue|ttwu)"),
    ("kernel: TCP/IP, socket, skb", r"\[k\] (tcp_|__tcp|skb|__skb|kfree_skb|ip_|__ip|inet|__inet|sock_|__sock|sk_|__sk|release_sock|lock_sock|net_|__net|__dev|dev_|loopback|netif|__netif|__napi|napi|bbr_|raw_|_raw|__raw|do_softirq|__do_softirq|__local_bh|local_bh|__sys_recv|__sys_send|sys_recv|sys_send|_copy_|copy_|__check_object|check_heap|__virt_addr|ipv4_|dst_|validate_xmit|__kmalloc|kmalloc|kmem_cache|__slab|___slab|slab|kfree|__kfree|page_frag|skb_page|__build_skb|__alloc_skb|rw_verify|do_iter|iov_iter|import_iovec|vfs_|new_sync|sock_write|sock_read|__list_del|__list_add|security_|read_tsc|ktime|rcu|__rcu|mod_timer|__mod_timer|nf_|__x86|get_random|__get_user)"),
    ("kernel: other", r"\[k\] "),
    ("libc: malloc/free", r"\[\.\] (malloc|_int_malloc|_int_free|free|cfree|__libc_free|__libc_malloc|realloc|_int_realloc|malloc_consolidate|tcache|unlink_chunk|__GI___libc_free|__GI___libc_malloc|__libc_calloc|calloc)\b"),
    ("libc: memcpy/memmove/memset", r"\[\.\] (__mem|mem)(move|cpy|set|cmp)"),
    ("libc: syscall wrappers", r"\[\.\] (__libc_recv|__libc_send|__GI___writev|__writev|__GI___readv|__libc_read|__libc_write|epoll_wait|__GI_epoll|__GI___pthread|__pthread|recv|send|writev|readv|read|write|__errno)"),
    ("vdso clock_gettime", r"vdso|clock_gettime"),
    ("sidecar:: (our code)", r"\[\.\] .*sidecar::"),
    ("hyper", r"\[\.\] .*hyper(_util)?::"),
    ("http / httparse / bytes", r"\[\.\] .*(\bhttp::|httparse::|bytes::)"),
    ("tokio / mio", r"\[\.\] .*(tokio::|mio::)"),
    ("core/alloc/std (drops, fmt, hashing...)", r"\[\.\] .*(core::|alloc::|std::|<alloc|<core|<std|__rust|rust_)"),
    ("other user", r"\[\.\] "),
]

KEY_INCLUSIVE = [
    ("sidecar::inbound::http::handle", "request handling (headers, rewrite, pool.send)"),
    ("sidecar::proxy::pool::Pool::send", "upstream send / pool"),
    ("sidecar::proxy::headers", "hop-by-hop removal, forwarding headers"),
    ("sidecar::telemetry", "metrics"),
    ("sidecar::inbound::guard::Guard::scan", "HTTP/1 framing guard"),
    ("sidecar::inbound::io", "socket wrapper"),
    ("hyper::proto::h1::role::Server", "hyper server parse/encode"),
    ("hyper::proto::h1::role::Client", "hyper client parse/encode"),
    ("hyper::proto::h1::io::Buffered", "hyper buffered io"),
    ("malloc", "malloc (inclusive)"),
    ("_int_free", "free (inclusive)"),
    ("__x64_sys_writev", "writev"),
    ("__x64_sys_write", "write"),
    ("__x64_sys_sendto", "sendto"),
    ("__x64_sys_recvfrom", "recvfrom (recv)"),
    ("__x64_sys_read", "read"),
    ("__x64_sys_epoll_wait", "epoll_wait"),
    ("__x64_sys_epoll_ctl", "epoll_ctl"),
    ("entry_SYSCALL_64", "all syscalls (inclusive)"),
]


def report(data, extra):
    r = subprocess.run(["perf", "report", "-i", data, "--stdio", "-g", "none", "--percent-limit", "0"] + extra,
                       capture_output=True, text=True, timeout=900)
    return r.stdout


def main():
    data = sys.argv[1]
    rows = []
    for line in report(data, ["--no-children", "--sort", "dso,symbol"]).splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+(\[[.k]\]\s+.*?)\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3)))
    totals = {g: 0.0 for g, _ in GROUPS}
    for pct, dso, sym in rows:
        key = f"{dso} {sym}"
        for g, rx in GROUPS:
            if re.search(rx, key):
                totals[g] += pct
                break
    print("## Self time by group (% of samples)\n")
    print("| group | % |\n|---|---|")
    for g, _ in GROUPS:
        print(f"| {g} | {totals[g]:.1f} |")
    print(f"\n(total {sum(totals.values()):.1f}%)\n")
    print("## Top 30 functions, self time\n")
    print("| % | where | function |\n|---|---|---|")
    for pct, dso, sym in sorted(rows, reverse=True)[:30]:
        print(f"| {pct:.2f} | {dso} | `{sym[4:][:110]}` |")
    inc = []
    for line in report(data, ["--children", "--sort", "symbol"]).splitlines():
        m = re.match(r"\s+([\d.]+)%\s+([\d.]+)%\s+(\[[.k]\]\s+.*?)\s*$", line)
        if m:
            inc.append((float(m.group(1)), float(m.group(2)), m.group(3)[4:]))
    print("\n## Inclusive (children) share of key functions\n")
    print("| incl % | function (best match) | what |\n|---|---|---|")
    for needle, what in KEY_INCLUSIVE:
        best = max((x for x in inc if needle in x[2] and (not needle.startswith("__x64") or x[2].strip() == needle)
                    and (needle not in ("malloc",) or x[2].strip() == "malloc")), default=None)
        if best:
            print(f"| {best[0]:.1f} | `{best[2][:90]}` | {what} |")
        else:
            print(f"| — | `{needle}` | {what} (no samples) |")


if __name__ == "__main__":
    main()
