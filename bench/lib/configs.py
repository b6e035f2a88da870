"""The config files of the app and of each proxy, as text: the same work in every proxy (one
worker, access logs off, upstream keep-alive, the forwarding headers Sidecar adds).

Not responsible for starting anything (targets.py)."""
from __future__ import annotations

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


def app_conf(d, port, h2port):
    return nginx_head(d) + f"""  sendfile on; tcp_nopush on;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
    root {d}/www;
    location = / {{ default_type text/plain; return 200 'hello world\\n'; }}
    location / {{ }}
  }}
}}
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


def nginx_proxy_conf(d, port, h2port, app_port, tls=None):
    return nginx_head(d) + f"""  upstream app {{
    server 127.0.0.1:{app_port};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    listen 127.0.0.1:{h2port} http2 backlog=4096;
{NGINX_PROXY_LOCATION}  }}{nginx_tls_servers(tls)}
}}
"""


def haproxy_conf(d, port, h2port, app_port, tls=None):
    bind_tls = (f"\n  bind 127.0.0.1:{tls['port']} ssl crt {tls['pem']} alpn h2,http/1.1" if tls else "")
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
frontend web
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{h2port} proto h2{bind_tls}
  # the forwarding headers Sidecar adds (HAProxy 2.6 has no `option forwarded` yet)
  option forwardfor
  http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
  http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
  http-request add-header Forwarded "for=%[src];proto=%[ssl_fc,iif(https,http)]"
  default_backend app
backend app
  server app 127.0.0.1:{app_port}
"""


def sidecar_conf(admin, port, app_port, tls=None):
    tls_in = (f"  - {{ name: web-tls, listen: 127.0.0.1:{tls['port']}, protocol: http, "
              f"tls: {{ cert: {tls['cert']}, key: {tls['key']} }} }}\n" if tls else "")
    return f"""admin: {{ listen: 127.0.0.1:{admin} }}
app: {{ address: 127.0.0.1:{app_port}, http: http1 }}
inbound:
  - {{ name: web, listen: 127.0.0.1:{port}, protocol: http }}
{tls_in}telemetry: {{ log_level: warn, access_log: {{ enabled: false }} }}
runtime: {{ worker_threads: 1 }}
"""
