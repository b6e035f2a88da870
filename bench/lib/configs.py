"""The config files of the app and of each proxy, as text: the same work in every proxy (one
worker, access logs off, upstream keep-alive, the forwarding headers Sidecar adds).

The upstream of a proxy is `app`, an address in the proxy's own syntax: TCP `127.0.0.1:PORT`
everywhere, or the app's Unix socket (nginx `unix:/PATH`, HAProxy `/PATH`, Sidecar `unix:/PATH`).
`l4`, where given, is `{"port", "target"}`: a TCP relay listener beside the HTTP ones (the L4 floor).

Not responsible for starting anything (targets.py)."""
from __future__ import annotations

import os
import re
import subprocess

BODY_SMALL = b"hello world\n"


def nginx_head(d):
    """What the app nginx and the proxy nginx share: one worker, no access log, unlimited keep-alive."""
    return f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; multi_accept on; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-body; proxy_temp_path {d}/tmp-proxy;
  fastcgi_temp_path {d}/tmp-fcgi; uwsgi_temp_path {d}/tmp-uwsgi; scgi_temp_path {d}/tmp-scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
"""


def app_conf(d, port, h2port, sock=None, listens="", servers=""):
    """The app; `sock`: also listen on this Unix socket (the `unix` workload); `listens`: more
    `listen` lines of the same server, `servers`: more servers (both: the outbound workloads)."""
    unix = f"    listen unix:{sock} backlog=4096;\n" if sock else ""
    unix += listens
    return nginx_head(d) + f"""  sendfile on; tcp_nopush on;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
{unix}    root {d}/www;
    location = / {{ default_type text/plain; return 200 'hello world\\n'; }}
    location / {{ }}
  }}
{servers}}}
"""


# The proxying both nginx servers (plain and TLS) do: upstream keep-alive, 1 MiB responses
# streamed through memory instead of nginx's default temp file on disk, and the forwarding
# headers Sidecar always adds (X-Forwarded-For appended, X-Forwarded-Proto, Forwarded), so that
# every proxy does the same work on every request.
NGINX_PROXY_LOCATION = """    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Forwarded "for=$remote_addr;proto=$scheme";
      proxy_buffer_size 16k;
      proxy_buffers 8 16k;
      proxy_max_temp_file_size 0;
    }
"""


def nginx_tls_servers(tls):
    """The TLS listeners of the nginx proxy: HTTP/1.1 on one port, h2 (ALPN) on a second one."""
    if not tls:
        return ""
    return f"""
  ssl_certificate {tls['cert']};
  ssl_certificate_key {tls['key']};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_conf_command NumTickets 1;
  server {{
    listen 127.0.0.1:{tls['port']} ssl backlog=4096;
    listen 127.0.0.1:{tls['h2port']} ssl http2 backlog=4096;
{NGINX_PROXY_LOCATION}  }}"""


STREAM_SO = "/usr/lib/nginx/modules/ngx_stream_module.so"


def nginx_stream():
    """How the nginx here gets its `stream` module (the L4 relay): `("", None)` when built in,
    `("load_module PATH;", None)` when the dynamic module is installed, `(None, why)` otherwise."""
    try:
        v = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nginx -V failed ({e})"
    if re.search(r"--with-stream(\s|$)", v):
        return "", None
    if "--with-stream=dynamic" in v and os.path.exists(STREAM_SO):
        return f"load_module {STREAM_SO};\n", None
    return None, "this nginx has no `stream` module (Debian: apt-get install libnginx-mod-stream)"


def nginx_stream_server(l4):
    """nginx's L4 relay: a `stream` server that pipes each connection to the app (no access log:
    off by default in `stream`)."""
    if not l4:
        return ""
    return f"""
stream {{
  upstream app_l4 {{ server {l4['target']}; }}
  server {{
    listen 127.0.0.1:{l4['port']} backlog=4096;
    proxy_pass app_l4;
  }}
}}
"""


def nginx_proxy_conf(d, port, h2port, app, tls=None, l4=None, load_module=""):
    return (load_module or "") + nginx_head(d) + f"""  upstream app {{
    server {app};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
{NGINX_PROXY_LOCATION}  }}{nginx_tls_servers(tls)}
}}
{nginx_stream_server(l4)}"""


def haproxy_l4(l4):
    """HAProxy's L4 relay: a frontend and backend in `mode tcp`, after a second `defaults`
    section so that the HTTP options of the first do not apply to them."""
    if not l4:
        return ""
    return f"""defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend l4
  bind 127.0.0.1:{l4['port']}
  default_backend app_l4
backend app_l4
  server app {l4['target']}
"""


def haproxy_head(d):
    """What every HAProxy config shares: one thread, HTTP keep-alive both ways, long timeouts."""
    return f"""
global
  nbthread 1
  maxconn 8000
  pidfile {d}/haproxy.pid
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
"""


def haproxy_conf(d, port, h2port, app, tls=None, l4=None):
    bind_tls = (f"\n  bind 127.0.0.1:{tls['port']} ssl crt {tls['pem']} alpn h2,http/1.1" if tls else "")
    return haproxy_head(d) + f"""frontend web
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2port} proto h2{bind_tls}
  # the forwarding headers Sidecar adds (HAProxy 2.6 has no `option forwarded` yet)
  option forwardfor
  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
  http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
  http-request add-header Forwarded "for=%[src];proto=%[ssl_fc,iif(https,http)]"
  default_backend app
backend app
  server app {app}
{haproxy_l4(l4)}"""


def sidecar_conf(admin, port, app, tls=None, l4=None):
    extra = (f"  - {{ name: web-tls, listen: 127.0.0.1:{tls['port']}, protocol: http, "
              f"tls: {{ cert: {tls['cert']}, key: {tls['key']} }} }}\n" if tls else "")
    # Sidecar's L4 relay: its own `protocol: tcp` listener, same runtime and worker
    extra += (f"  - {{ name: l4, listen: 127.0.0.1:{l4['port']}, protocol: tcp, target: {l4['target']} }}\n"
               if l4 else "")
    return f"""admin: {{ listen: 127.0.0.1:{admin} }}
app: {{ address: {app}, http: http1 }}
inbound:
  - {{ name: web, listen: 127.0.0.1:{port}, protocol: http }}
{extra}{sidecar_telemetry()}
runtime: {{ worker_threads: 1 }}
"""


def sidecar_telemetry() -> str:
    """Sidecar's `telemetry` section: access log and tracing off, or with
    BENCH_SIDECAR_TELEMETRY=on both on (every request sampled, spans to the sink bench.py
    starts, access-log lines to BENCH_ACCESS_LOG, /dev/null unless set): what issue 12's bar
    compares."""
    level = os.environ.get("BENCH_SIDECAR_LOG_LEVEL", "warn")
    if os.environ.get("BENCH_SIDECAR_TELEMETRY") != "on":
        return f"telemetry: {{ log_level: {level}, access_log: {{ enabled: false }} }}"
    log = os.environ.get("BENCH_ACCESS_LOG", "/dev/null")
    return (f"telemetry:\n  log_level: {level}\n"
            f"  access_log: {{ enabled: true, format: json, path: {log} }}\n"
            f"  tracing: {{ otlp_endpoint: \"{os.environ['BENCH_OTLP_ENDPOINT']}\", sample_ratio: 1.0 }}")
