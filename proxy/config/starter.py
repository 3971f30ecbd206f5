"""The starter config written by `pyproxy init`, and TOML rendering for config dicts.

The starter is hand-written text because its value is in the comments, which tomli-w cannot write.
Tests load it with load_config, so it can never drift out of the contract (docs/configuration.md).
"""
from __future__ import annotations

import os

import tomli_w

STARTER_CONFIG = '''\
# pyproxy configuration. Check it with:  pyproxy check -c proxy.toml
# Durations are seconds or strings like "250ms", "5s", "2m"; sizes are bytes or "16KiB", "10MiB".
# Addresses are "host:port", "[::1]:port", or ":port" for all interfaces.

[server]
listen = "127.0.0.1:8080"      # where clients connect; a list for several addresses
# or: listen = [{ address = ":80", redirect_https = true }, ...]  # a 308 to https for every request on :80
# behind an AWS NLB or HAProxy (mode tcp): listen = [{ address = ":8080", proxy_protocol = true }]
#   every connection then starts with a PROXY header naming the client; needs trusted_proxies below
workers = 1                    # worker processes; "auto" = one per CPU
min_threads = 4                # threads per worker kept ready
max_threads = 256              # at most this many requests in progress per worker
thread_idle_timeout = "30s"    # a thread above min_threads that has been idle this long exits
max_connections = 10000        # per worker; past it new clients get 503 and are closed
graceful_timeout = "30s"       # on SIGTERM, in-flight requests get this long to finish
header_timeout = "10s"         # the whole request head must arrive within this (slowloris)
idle_timeout = "75s"           # idle keep-alive client connections are closed after this
max_header_bytes = "16KiB"     # request line + headers; past it 431 (414 for the line alone)
max_body_bytes = "100MiB"      # request body; past it 413
body_timeout = "60s"           # longest gap between request body reads; past it 408 (slow POST)
send_timeout = "60s"           # a client that reads nothing of its response for this long is dropped
tunnel_timeout = "1h"          # an upgraded connection (WebSocket) in which nothing moves for this long is closed
h2_max_streams = 100           # HTTP/2: requests in progress at once on one client connection
# trusted_proxies = ["10.0.0.0/8"]  # load balancers in front of us whose X-Forwarded-For we believe

# HTTPS with your own certificate (PEM files, relative to this file):
#   listen = [{ address = ":443", tls_cert = "fullchain.pem", tls_key = "privkey.pem" }]
# HTTPS for local development with certificates from pyproxy's own CA (run `pyproxy trust` once):
# add the listener { address = "127.0.0.1:8443", tls = "internal" } to server.listen above.
# TLS listeners speak HTTP/2 to clients that offer it (http2 = false in the listener turns it off);
# a plain listener takes HTTP/2 with prior knowledge with { address = ":8080", h2c = true }.

# [tls]
# internal_ca_dir = "~/.local/share/pyproxy/ca"  # the local CA's root.crt and root.key
# internal_names = [".test"]   # domains besides localhost it may issue for; a change needs a new root

[admin]                        # delete this table to run without an admin listener
listen = "127.0.0.1:9901"      # GET /healthz, /status, /metrics; keep it on loopback
# token_file = "admin.token"   # turns on the runtime API's writes (pyproxy ctl drain/enable); or token = "..."

[log]
level = "info"                 # debug | info | warning | error
access = "stdout"              # stdout | stderr | off | a file path (relative to this file)
format = "combined"            # combined (Apache/nginx style) | json

# Routes: the most specific wins. An exact host beats "*.wildcard", which beats no host;
# then the longest path prefix; ties go to the first in this file.
# A prefix matches on segment boundaries: "/api" matches /api, /api/x and /api?q, not /apix.

# [[routes]]
# host = "api.localhost"       # the request's Host header, port ignored
# path = "/api"
# strip_prefix = true          # forward /api/users as /users
# upstream = "api"
# set_headers = { X-Env = "dev" }  # request headers to set on the way in
# allow = ["10.0.0.0/8", "192.168.1.5"]  # only these clients (IPv4/IPv6, CIDR); others get 403
# deny = ["10.1.0.0/16"]       # refused with 403; deny wins over allow
# basic_auth = { realm = "staff", users = { alice = "$2b$12$..." } }  # 401 until signed in;
#                              # hashes from `pyproxy hash-password`, or users_file = "users.htpasswd"
#                              # (htpasswd -B); forward_auth_header = true passes Authorization on
# compress = true             # gzip/br/zstd for clients that accept it (text, JSON, JS, XML, SVG)
# or: compress = { encodings = ["zstd", "br", "gzip"], min_length = 1024, types = ["text/*", "application/json"] }
# rate_limit = { requests = 100, per = "1m", burst = 20 }  # per client address; past it 429
#                              # (or key = "header:X-Api-Key"); one limit for all workers, per proxy instance

# [[routes]]
# host = "old.localhost"
# redirect = { to = "https://new.localhost{uri}", status = 308 }  # instead of upstream; also {host} {path} {query}

[[routes]]
path = "/"                     # everything else
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:3000"]   # "host:port", "https://host:port", or { address = "...", weight = 3 }
                               # every address of a DNS name: { address = "api.internal:8080", discover = "a" }
policy = "round_robin"         # round_robin | least_connections | random | ip_hash (weights honoured)
preserve_host = true           # pass the client's Host header; false = send the server's address
keepalive = 32                 # idle pooled connections kept per server
keepalive_timeout = "30s"      # keep below the backend's own idle timeout
# send_proxy_protocol = "v2"   # a PROXY header ("v1" or "v2") on each new connection, for backends that read it
# tls_ca = "internal-ca.pem"   # https:// servers: trust this CA instead of the system store
# tls_verify = true            # https:// servers: check their certificate (false only for test setups)
max_connections = 0            # concurrent connections per server; 0 = unlimited
connect_timeout = "5s"
read_timeout = "60s"           # response head, and each gap between body reads
retries = 2                    # other servers tried, only when the request cannot have been processed
retry_budget = { percent = 20, min_per_second = 3 }  # retries stay under 20% of requests (or 3/s) over 10 s
max_ejected_percent = 100      # checks never take more than this share of servers out; the rest keep serving
all_down = "fail"              # every server down: fail = 503 | try_all = send to all of them anyway
slow_start = "0s"              # a server back up (or added) ramps from 10% to 100% of its weight over this; 0s = off

# Active health checks: uncomment once your app answers on the path below.
# [upstreams.app.health]
# path = "/healthz"
# interval = "5s"
# timeout = "2s"              # at most interval; without it, 2s or the interval if shorter
# expect_status = "2xx"        # "2xx", 200, or [200, 204]
# healthy_after = 2            # consecutive passes before a down server gets traffic again
# unhealthy_after = 3          # consecutive failures before a server is taken out
# method = "GET"               # GET | HEAD
# host = "health.internal"     # Host header of the probe; default: the server's address
# headers = { X-Health-Token = "secret" }  # extra probe headers
# port = 9090                  # probe another port of the server's host (an admin port)
# expect_body = "ok"           # the body must contain this; "~regex" for a regular expression
#                              # (redirects are never followed: a 3xx fails unless expect_status lists it)

# Passive checks (like nginx max_fails / fail_timeout): a server that fails max_fails requests
# within fail_timeout is taken out for fail_timeout. As in nginx, the only server of an upstream
# is never taken out this way (there is nowhere else to send its requests); health checks still can.
# [upstreams.app.passive]
# max_fails = 3
# fail_timeout = "10s"
# statuses = ["5xx"]           # answers that count as failures too (or codes: [502, 503]); default none

# Servers found in DNS ({ address = "api.internal:8080", discover = "a" } or
# { srv = "_http._tcp.api.service.consul" } in an upstream's servers) are resolved like this:
# [dns]
# resolvers = ["10.96.0.10"]   # name servers, "ip" or "ip:port"; default: /etc/resolv.conf
# refresh = "10s"              # re-resolve at the earlier of this and the TTL (at most once a second)
# timeout = "2s"               # a failed lookup keeps the addresses found before
'''


def write_starter(path: str | os.PathLike, force: bool = False) -> None:
    """Write STARTER_CONFIG to path. Raises FileExistsError if it exists and force is false."""
    # "x" creates exclusively, so there is no window between checking and writing.
    with open(path, "w" if force else "x", encoding="utf-8") as file:
        file.write(STARTER_CONFIG)


def render_config_dict(data: dict) -> str:
    """TOML text for a config dict (no comments), e.g. to save a generated config."""
    return tomli_w.dumps(data)
