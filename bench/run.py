#!/usr/bin/env python3
"""Sidemesh data-plane benchmark (run it through bench/run.sh).

Topologies, each in front of the same nginx backend that answers `200 ok`:
  direct        load generator -> backend
  sidemesh-1    -> one Sidemesh proxy (explicit upstream listener) -> backend
  sidemesh-2    -> client-side proxy -> server-side proxy (inbound) -> backend: one mesh hop
  nginx-2       -> nginx -> nginx -> backend (keep-alive upstreams)
  haproxy-2     -> HAProxy -> HAProxy -> backend (http-reuse always)
  nginx-2-mtls, haproxy-2-mtls   the same pairs with the middle hop over mutual TLS 1.3 (tls_material)
  nginx-2-mtls-noreuse, haproxy-2-mtls-noreuse   the same without reusing middle-hop connections:
                one TCP connect and TLS handshake per request (these four are not in the default run)
gRPC (h2load, demo user-service as backend): direct, sidemesh-1, sidemesh-2.

Machines here are shared and noisy, so: the load generator runs on core 0 and every server
process on core 1 (taskset); topologies are interleaved within each round; results are
medians over rounds with the spread (min-max); everything is compared with the direct
baseline of the same round. CPU cost is CPU time of the proxy processes per request, read
from /proc, which does not depend on how busy the machine is.
"""

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
LOAD_CORE, SERVER_CORE = "0", "1"
CLK = os.sysconf("SC_CLK_TCK")
# The profile (bench/cost_profile.py) runs the proxies under a tool: WRAP(name, args) -> args.
WRAP = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a started server may take to listen (the profile raises it for proxies under valgrind).
PORT_WAIT = 10.0


def wait_port(port, timeout=None):
    timeout = timeout or PORT_WAIT
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime (whole process)
        except FileNotFoundError:
            pass
    return total / CLK


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pids):
    """Proportional set size of `pids`, summed: a page shared by several processes (nginx's master
    and worker, the C library) counts once across them, where RSS would count it in each."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class PeakMemory:
    """Samples the PSS of `pids` every 100 ms while a load runs; `peak` is the highest sum seen."""

    def __init__(self, pids):
        import threading
        self.pids, self.peak = pids, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.done.wait(0.1):
            self.peak = max(self.peak, pss_kib(self.pids))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def children(pid, timeout=5.0):
    """The processes `pid` started: an nginx master listens before it forks its worker, so wait
    for one rather than measure the master alone."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        if out or time.time() > deadline:
            return [int(p) for p in out]
        time.sleep(0.05)


class Procs:
    """Server-side processes of one topology, pinned to the server core."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, args, env=None, name="proc"):
        log = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        full_env = dict(os.environ, RUST_LOG="warn", **(env or {}))
        if WRAP and name.startswith("proxy-"):
            args = WRAP(name, args)
        p = subprocess.Popen(["taskset", "-c", SERVER_CORE] + args, stdout=log, stderr=log, env=full_env,
                             preexec_fn=raise_nofile)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def nginx_conf(tmp, name, port, target=None, listen_tls="", upstream_tls="", keepalive=True):
    """`listen_tls`: server directives that make the listener TLS; `upstream_tls`: proxy_ssl_* directives
    that make the upstream hop TLS (both from nginx_mtls); keepalive=False closes the upstream connection
    after every request. The defaults give the plaintext configuration."""
    scheme = "https" if upstream_tls else "http"
    reuse = ' proxy_set_header Connection "";' if keepalive else ""  # else nginx sends Connection: close
    body = (f"location / {{ proxy_pass {scheme}://up; proxy_http_version 1.1;{reuse}{upstream_tls} }}"
            if target else 'location / { return 200 "ok\\n"; }')
    # As many idle upstream connections as the widest load has clients: nginx closes the ones past
    # this number after each request, and the benchmark would measure reconnects.
    pool = " keepalive 512;" if keepalive else ""
    upstream = f"upstream up {{ server 127.0.0.1:{target};{pool} }}" if target else ""
    listen = f"127.0.0.1:{port}{' ssl' if listen_tls else ''} backlog=4096"
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; master_process on;
pid {tmp}/{name}.pid; error_log {tmp}/{name}.err warn;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path {tmp}/{name}-body; proxy_temp_path {tmp}/{name}-proxy;
  {upstream}
  server {{ listen {listen};{listen_tls} {body} }} }}
""")
    return conf


def haproxy_conf(tmp, name, port, target, bind_tls="", server_tls="", reuse=True):
    """`bind_tls`/`server_tls`: options appended to the bind and server lines (from haproxy_mtls);
    reuse=False gives every request its own server connection. The defaults give the plaintext one."""
    # Overrides the defaults' http-reuse always for this backend only; http-server-close makes HAProxy
    # close the server side after each response (the client side stays keep-alive).
    no_reuse = "  http-reuse never\n  option http-server-close\n" if not reuse else ""
    conf = os.path.join(tmp, f"{name}.cfg")
    with open(conf, "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend f
  bind 127.0.0.1:{port}{bind_tls}
  default_backend b
backend b
{no_reuse}  server s1 127.0.0.1:{target}{server_tls}
""")
    return conf


def tls_material(tmp):
    """A throwaway CA and two leaf certificates it signs, all ECDSA P-256 (what a mesh CA issues):
    proxy A's is a client certificate, proxy B's a server certificate for `proxy-b`; both carry a
    SPIFFE ID like a mesh workload's. Made once per `tmp`; returns the paths."""
    paths = {"ca": os.path.join(tmp, "ca.crt"), "ca_key": os.path.join(tmp, "ca.key")}
    for n in ("a", "b"):
        paths[n + "_crt"] = os.path.join(tmp, f"{n}.crt")
        paths[n + "_key"] = os.path.join(tmp, f"{n}.key")
        paths[n + "_pem"] = os.path.join(tmp, f"{n}.pem")  # certificate then key, for HAProxy's crt
    if all(os.path.exists(p) for p in paths.values()):
        return paths

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    # openssl 3.0's req -x509 already adds CA:TRUE from its default config; -addext makes it explicit.
    openssl("req", "-x509", *ec, "-keyout", paths["ca_key"], "-out", paths["ca"], "-days", "2",
            "-subj", "/CN=sidemesh-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    leaves = {"a": ("clientAuth", "URI:spiffe://cluster.local/ns/bench/sa/a"),
              "b": ("serverAuth", "DNS:proxy-b,URI:spiffe://cluster.local/ns/bench/sa/b")}
    for n, (usage, san) in leaves.items():
        csr, ext = os.path.join(tmp, f"{n}.csr"), os.path.join(tmp, f"{n}.ext")
        openssl("req", "-new", *ec, "-keyout", paths[n + "_key"], "-out", csr, "-subj", f"/CN=proxy-{n}")
        # x509 -req ignores the CSR's extensions (openssl 3.0), so they come from an extfile.
        with open(ext, "w") as f:
            f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    f"extendedKeyUsage={usage}\nsubjectAltName={san}\n")
        openssl("x509", "-req", "-in", csr, "-CA", paths["ca"], "-CAkey", paths["ca_key"], "-CAcreateserial",
                "-days", "2", "-extfile", ext, "-out", paths[n + "_crt"])
        with open(paths[n + "_pem"], "w") as f:
            f.write(open(paths[n + "_crt"]).read() + open(paths[n + "_key"]).read())
    return paths


def nginx_mtls(tls):
    """(B's listener directives, A's upstream directives) for TLS 1.3 with mutual authentication:
    B requires a client certificate signed by the CA, A checks B's certificate and name against it.
    Session resumption stays nginx's default: B issues TLS 1.3 session tickets (ssl_session_tickets on,
    stateless, so no ssl_session_cache is needed) and A keeps the last session per upstream server and
    offers it on its next connection (proxy_ssl_session_reuse on, the default, spelled out). With
    keep-alive that only matters for the pool's first connections; without it, most handshakes are
    resumptions (PSK + ECDHE, no certificate exchange or verification); connections A opens before its
    latest ticket has arrived make full ones (about 1 in 6 at 10 concurrent requests)."""
    # nginx completes the handshake even without a (valid) client certificate and then answers 400
    # itself (status 496/495 internally); 444 closes the connection instead, so a client without A's
    # certificate gets no HTTP answer at all, as from HAProxy, which aborts the handshake.
    listen = (f" ssl_certificate {tls['b_crt']}; ssl_certificate_key {tls['b_key']};"
              f" ssl_client_certificate {tls['ca']}; ssl_verify_client on; ssl_protocols TLSv1.3;"
              " error_page 495 496 = @refuse; location @refuse { return 444; }")
    upstream = (f" proxy_ssl_certificate {tls['a_crt']}; proxy_ssl_certificate_key {tls['a_key']};"
                f" proxy_ssl_trusted_certificate {tls['ca']}; proxy_ssl_verify on; proxy_ssl_name proxy-b;"
                " proxy_ssl_server_name on; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;")
    return listen, upstream


def haproxy_mtls(tls):
    """(B's bind options, A's server options) for TLS 1.3 with mutual authentication, as nginx_mtls.
    Session resumption stays HAProxy's default: B's bind issues session tickets and keeps a session
    cache (tune.ssl.cachesize 20000), A's server line keeps the last session and offers it on the next
    connection (no `no-ssl-reuse`), so without connection reuse each request is a resumption.
    With `sni`, HAProxy checks B's certificate against the SNI name; verifyhost (same name) only
    applies when no SNI is sent and is there to keep the check if sni is ever dropped."""
    bind = f" ssl crt {tls['b_pem']} verify required ca-file {tls['ca']} alpn http/1.1 ssl-min-ver TLSv1.3"
    server = (f" ssl verify required ca-file {tls['ca']} crt {tls['a_pem']} sni str(proxy-b) verifyhost proxy-b"
              " alpn http/1.1 ssl-min-ver TLSv1.3")
    return bind, server


POLICIES = """routes:
  - name: guarded
    service: backend
    timeout: 5s
    retry: {attempts: 3, retryOn: [5xx, connect-failure]}
    rateLimit: {rate: 1000000/s, burst: 1000000}
"""


def mesh_yaml(tmp, name, endpoint, extra=""):
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""apiVersion: sidemesh.io/v1
kind: Mesh
services:
  - name: client
    ports: [{{port: 1}}]
  - name: backend
    ports: [{{port: 80}}]
    endpoints: ["127.0.0.1:{endpoint}"]
{extra}""")
    return path


def proxy_args(config, service, extra):
    return [os.path.join(REL, "sidemesh-proxy"), "--config", config, "--service", service,
            "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "text"] + extra


def start_topology(kind, procs, tmp, backend_port, grpc=False):
    """Returns (url port, pids whose CPU is the topology's cost, pids for memory). `grpc`: the
    backend speaks gRPC (HTTP/2 without TLS), so nginx and HAProxy pairs are set up for HTTP/2 end
    to end (Sidemesh detects it on its own)."""
    if kind == "direct":
        return backend_port, [], []
    if grpc and kind in ("nginx-2-mtls", "haproxy-2-mtls"):
        return start_grpc_pair(kind, procs, tmp, backend_port)
    if kind == "sidemesh-2-mtls-full":
        return start_sidemesh_mtls(procs, tmp, backend_port, reuse=True, full=True)
    if kind == "sidemesh-1":
        front = free_port()
        p = procs.start(proxy_args(mesh_yaml(tmp, "one", backend_port), "client",
                                   ["--upstream", f"backend=127.0.0.1:{front}"]), name="proxy-a")
        wait_port(front)
        return front, [p.pid], [p.pid]
    if kind == "sidemesh-1-policies":
        front = free_port()
        p = procs.start(proxy_args(mesh_yaml(tmp, "policies", backend_port, POLICIES), "client",
                                   ["--upstream", f"backend=127.0.0.1:{front}"]), name="proxy-a")
        wait_port(front)
        return front, [p.pid], [p.pid]
    if kind == "sidemesh-2":
        front, inbound = free_port(), free_port()
        b = procs.start(proxy_args(mesh_yaml(tmp, "two", inbound), "backend",
                                   ["--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{backend_port}"]),
                        name="proxy-b")
        a = procs.start(proxy_args(mesh_yaml(tmp, "two", inbound), "client",
                                   ["--upstream", f"backend=127.0.0.1:{front}"]), name="proxy-a")
        wait_port(inbound)
        wait_port(front)
        return front, [a.pid, b.pid], [a.pid, b.pid]
    if kind == "nginx-2":
        front, middle = free_port(), free_port()
        nb = procs.start(["nginx", "-c", nginx_conf(tmp, "ngx-b", middle, backend_port), "-p", tmp], name="ngx-b")
        na = procs.start(["nginx", "-c", nginx_conf(tmp, "ngx-a", front, middle), "-p", tmp], name="ngx-a")
        wait_port(middle)
        wait_port(front)
        pids = [na.pid, nb.pid] + children(na.pid) + children(nb.pid)
        return front, pids, pids
    if kind == "haproxy-2":
        front, middle = free_port(), free_port()
        hb = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-b", middle, backend_port)], name="hap-b")
        ha = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-a", front, middle)], name="hap-a")
        wait_port(middle)
        wait_port(front)
        return front, [ha.pid, hb.pid], [ha.pid, hb.pid]
    if kind.startswith("sidemesh-2-trace-"):
        # As sidemesh-2, with spans at a sampling ratio of <n>% sent to the collector.
        ratio = int(kind.rsplit("-", 1)[1]) / 100
        tracing = f"mesh:\n  tracing: {{otlpEndpoint: \"http://127.0.0.1:{COLLECTOR_PORT}\", sampling: {ratio}}}\n"
        front, inbound = free_port(), free_port()
        config = mesh_yaml(tmp, kind, inbound, tracing)
        b = procs.start(proxy_args(config, "backend",
                                   ["--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{backend_port}"]),
                        name="proxy-b")
        a = procs.start(proxy_args(config, "client", ["--upstream", f"backend=127.0.0.1:{front}"]), name="proxy-a")
        wait_port(inbound)
        wait_port(front)
        return front, [a.pid, b.pid], [a.pid, b.pid]
    if kind == "sidemesh-2-mtls-h1":
        # As sidemesh-2-mtls with multiplexing off: one TLS connection per concurrent request.
        return start_sidemesh_mtls(procs, tmp, backend_port, reuse=True, env={"SIDEMESH_HTTP1_MULTIPLEX": "false"})
    if kind in ("sidemesh-2-mtls", "sidemesh-2-mtls-noreuse"):
        # Two proxies in control-plane mode: the control plane's CA certifies both, and A reaches B
        # over mutual TLS 1.3 with SPIFFE checks. -noreuse keeps no idle upstream connection, so
        # every request makes a new handshake (resumed when A holds a ticket, as nginx and HAProxy do).
        return start_sidemesh_mtls(procs, tmp, backend_port, reuse=not kind.endswith("-noreuse"))
    if kind in ("nginx-2-mtls", "nginx-2-mtls-noreuse"):
        # As nginx-2, with the A -> B hop over mutual TLS 1.3; -noreuse closes A -> B after every
        # request, so each one pays a TCP connect and a TLS handshake (the cost connection reuse saves).
        front, middle = free_port(), free_port()
        listen_tls, upstream_tls = nginx_mtls(tls_material(tmp))
        reuse = not kind.endswith("-noreuse")
        nb = procs.start(["nginx", "-c", nginx_conf(tmp, "ngx-b", middle, backend_port, listen_tls=listen_tls),
                          "-p", tmp], name="ngx-b")
        na = procs.start(["nginx", "-c", nginx_conf(tmp, "ngx-a", front, middle, upstream_tls=upstream_tls,
                                                    keepalive=reuse), "-p", tmp], name="ngx-a")
        wait_port(middle)
        wait_port(front)
        pids = [na.pid, nb.pid] + children(na.pid) + children(nb.pid)
        return front, pids, pids
    if kind in ("haproxy-2-mtls", "haproxy-2-mtls-noreuse"):
        front, middle = free_port(), free_port()
        bind_tls, server_tls = haproxy_mtls(tls_material(tmp))
        reuse = not kind.endswith("-noreuse")
        hb = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-b", middle, backend_port, bind_tls=bind_tls)],
                         name="hap-b")
        ha = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-a", front, middle, server_tls=server_tls,
                                                               reuse=reuse)], name="hap-a")
        wait_port(middle)
        wait_port(front)
        return front, [ha.pid, hb.pid], [ha.pid, hb.pid]
    raise ValueError(kind)


MTLS_MESH = """apiVersion: sidemesh.io/v1
kind: Mesh
mesh: {mtls: strict}
services:
  - name: client
  - name: backend
    ports: [{port: 80}]
"""

# The policies a production route would have, configured but never triggered by the benchmark:
# retries (gRPC calls included), a rate limit far above the load, and tracing at 1 % sampling to a
# real collector.
FULL_MESH = """apiVersion: sidemesh.io/v1
kind: Mesh
mesh:
  mtls: strict
  tracing: {{otlpEndpoint: "http://127.0.0.1:{collector}", sampling: 0.01}}
services:
  - name: client
  - name: backend
    ports: [{{port: 80}}]
routes:
  - name: guarded
    service: backend
    timeout: 5s
    retry: {{attempts: 3, retryOn: [5xx, connect-failure, unavailable], nonIdempotent: true}}
    rateLimit: {{rate: 1000000/s, burst: 1000000}}
"""


def start_sidemesh_mtls(procs, tmp, backend_port, reuse, full=False, env=None):
    name = "mtls-full" if full else "mtls"
    config_dir = os.path.join(tmp, f"{name}-config")
    os.makedirs(config_dir, exist_ok=True)
    with open(os.path.join(config_dir, "mesh.yaml"), "w") as f:
        f.write(FULL_MESH.format(collector=COLLECTOR_PORT) if full else MTLS_MESH)
    data = os.path.join(tmp, f"{name}-cp")
    grpc, cp_admin = free_port(), free_port()
    procs.start([os.path.join(REL, "sidemesh-control-plane"), "--config", config_dir, "--data-dir", data,
                 "--listen", f"127.0.0.1:{grpc}", "--admin", f"127.0.0.1:{cp_admin}", "--log-format", "text"],
                name="control-plane")
    wait_port(grpc)
    cp = ["--control-plane", f"https://127.0.0.1:{grpc}", "--trust-bundle", os.path.join(data, "trust-bundle.pem"),
          "--join-token-file", os.path.join(data, "join-token"),
          "--outbound", "127.0.0.1:0", "--log-format", "text"]
    front, inbound, admin_a = free_port(), free_port(), free_port()
    b = procs.start([os.path.join(REL, "sidemesh-proxy"), "--service", "backend", *cp, "--proxy-id", "b",
                     "--inbound", f"127.0.0.1:{inbound}", "--app", f"127.0.0.1:{backend_port}",
                     "--admin", "127.0.0.1:0"], env=env, name="proxy-b")
    extra = [] if reuse else ["--max-idle-per-endpoint", "0"]
    a = procs.start([os.path.join(REL, "sidemesh-proxy"), "--service", "client", *cp, "--proxy-id", "a",
                     "--upstream", f"backend=127.0.0.1:{front}", *extra, "--admin", f"127.0.0.1:{admin_a}"],
                    env=env, name="proxy-a")
    wait_port(front)
    # Ready when A routes to B's inbound listener as a meshed endpoint (pushed by the control plane).
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            dump = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{admin_a}/config_dump", timeout=1).read())
            if any(e.get("identity") and e["addr"].endswith(f":{inbound}") for e in dump.get("endpoints", [])):
                return front, [a.pid, b.pid], [a.pid, b.pid]
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("proxy A never learned proxy B as a meshed endpoint")


def nginx_grpc_conf(tmp, name, port, target, listen_tls="", upstream_tls=""):
    """An nginx gRPC proxy: HTTP/2 in, `grpc_pass` out over a keep-alive pool; the TLS directives
    are nginx_mtls's, spelled for the grpc module."""
    scheme = "grpcs" if upstream_tls else "grpc"
    conf = os.path.join(tmp, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; master_process on;
pid {tmp}/{name}.pid; error_log {tmp}/{name}.err warn;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 10000000; keepalive_timeout 300s; http2_max_requests 10000000;
  client_body_temp_path {tmp}/{name}-body;
  upstream up {{ server 127.0.0.1:{target}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port}{' ssl' if listen_tls else ''} http2 backlog=4096;{listen_tls}
    location / {{ grpc_pass {scheme}://up;{upstream_tls.replace('proxy_ssl_', 'grpc_ssl_')} }} }} }}
""")
    return conf


def start_grpc_pair(kind, procs, tmp, backend_port):
    """nginx or HAProxy pairs for gRPC, the A -> B hop over mutual TLS 1.3 with ALPN h2."""
    front, middle = free_port(), free_port()
    tls = tls_material(tmp)
    if kind == "nginx-2-mtls":
        listen_tls, upstream_tls = nginx_mtls(tls)
        nb = procs.start(["nginx", "-c", nginx_grpc_conf(tmp, "ngx-grpc-b", middle, backend_port,
                                                         listen_tls=listen_tls), "-p", tmp], name="ngx-b")
        na = procs.start(["nginx", "-c", nginx_grpc_conf(tmp, "ngx-grpc-a", front, middle,
                                                         upstream_tls=upstream_tls), "-p", tmp], name="ngx-a")
        wait_port(middle)
        wait_port(front)
        pids = [na.pid, nb.pid] + children(na.pid) + children(nb.pid)
        return front, pids, pids
    bind_tls, server_tls = haproxy_mtls(tls)
    bind_tls, server_tls = bind_tls.replace("alpn http/1.1", "alpn h2"), server_tls.replace("alpn http/1.1", "alpn h2")
    hb = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-grpc-b", middle, backend_port,
                                                           bind_tls=bind_tls, server_tls=" proto h2")], name="hap-b")
    ha = procs.start(["haproxy", "-db", "-f", haproxy_conf(tmp, "hap-grpc-a", front, middle, bind_tls=" proto h2",
                                                           server_tls=server_tls)], name="hap-a")
    wait_port(middle)
    wait_port(front)
    return front, [ha.pid, hb.pid], [ha.pid, hb.pid]


def start_with_retry(kind, procs, tmp, backend_port, attempts=3, grpc=False):
    """A free port can be taken between picking and binding it (ephemeral ports of live
    connections); start again on fresh ports rather than lose the run."""
    for attempt in range(attempts):
        try:
            return start_topology(kind, procs, tmp, backend_port, grpc=grpc)
        except RuntimeError as e:
            procs.stop()
            if attempt == attempts - 1:
                raise
            print(f"  {kind}: {e}; retrying on fresh ports", flush=True)


def wrk(port, seconds, connections):
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    # Resets and timeouts are not answers at all: wrk counts them on a line of their own.
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(errors.group(1)) if errors else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    return rps, total, failed


def latency(port, rate, seconds, path="", grpc_body=None):
    extra = ["--grpc-body", grpc_body] if grpc_body else []
    out = subprocess.run(["taskset", "-c", LOAD_CORE, os.path.join(REL, "bench-latency"), "--url",
                          f"http://127.0.0.1:{port}/{path}", "--rate", str(rate), "--duration", f"{seconds}s",
                          *extra], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def h2load(port, requests, body_file):
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "h2load", "-n", str(requests), "-c", "4", "-m", "16",
                          "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", body_file,
                          f"http://127.0.0.1:{port}/demo.users.v1.UserService/GetUser"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    ok = int(re.search(r"(\d+) succeeded", out).group(1))
    return rps, ok


def idle_connections(tmp, backend_port, count):
    """One proxy holding `count` idle keep-alive client connections (one request each), then the
    same connections closed: its RSS before, with them, and 3 s after they closed (KiB)."""
    procs = Procs(tmp)
    try:
        front = free_port()
        p = procs.start(proxy_args(mesh_yaml(tmp, "idle", backend_port), "client",
                                   ["--upstream", f"backend=127.0.0.1:{front}", "--detect", "120s", "--header", "120s"]),
                        name="proxy-idle")
        wait_port(front)
        req = b"GET / HTTP/1.1\r\nhost: backend\r\n\r\n"
        for _ in range(50):  # warm the pool and allocator
            with socket.create_connection(("127.0.0.1", front)) as s:
                s.sendall(req)
                s.recv(4096)
        time.sleep(0.5)
        before = rss_kib(p.pid)
        raise_nofile()
        socks = []
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", front))
            s.sendall(req)
            s.recv(4096)
            socks.append(s)
        time.sleep(1.0)
        held = rss_kib(p.pid)
        for s in socks:
            s.close()
        time.sleep(3.0)
        return {"count": count, "before": before, "held": held, "after": rss_kib(p.pid)}
    finally:
        procs.stop()


def measure_http(kind, port, cpu_pids, mem_pids, connections, seconds, rate, wide=0):
    """One HTTP/1.1 measurement of a started topology: memory idle (PSS before any request), a 1 s
    wrk warm-up, throughput and the proxies' CPU per request under wrk, peak PSS during that load,
    then latency at a fixed rate (open loop). Failed requests abort the run: a benchmark of errors
    is not a benchmark."""
    idle = pss_kib(mem_pids) / 1024
    wrk(port, 1, connections)
    cpu0 = cpu_seconds(cpu_pids)
    with PeakMemory(mem_pids) as mem:
        rps, total, errors = wrk(port, seconds, connections)
    cpu = cpu_seconds(cpu_pids) - cpu0
    peak = mem.peak / 1024
    if errors:
        raise RuntimeError(f"{kind}: {errors} failed requests under load")
    lat = latency(port, rate, seconds)
    if lat["errors"]:
        raise RuntimeError(f"{kind}: {lat['errors']} failed requests at {rate} req/s")
    m = {"rps": rps, "cpu_us": cpu / total * 1e6 if cpu_pids else 0.0, "p50": lat["p50_us"],
         "p99": lat["p99_us"], "p999": lat["p999_us"], "rss_idle": idle, "rss_load": peak}
    if wide:
        # The same topology under `wide` client connections: throughput, CPU and peak memory.
        wrk(port, 1, wide)
        cpu0 = cpu_seconds(cpu_pids)
        with PeakMemory(mem_pids) as mem:
            rps, total, errors = wrk(port, seconds, wide)
        if errors:
            raise RuntimeError(f"{kind}: {errors} failed requests under load at {wide} connections")
        m.update({"rps_wide": rps, "cpu_us_wide": (cpu_seconds(cpu_pids) - cpu0) / total * 1e6 if cpu_pids else 0.0,
                  "rss_load_wide": mem.peak / 1024})
    return m


def measure_grpc(kind, port, cpu_pids, mem_pids, body_file, requests, seconds, rate):
    """The same for gRPC: h2load throughput (4 connections, 16 streams each) and CPU, then unary-call
    latency at a fixed rate over HTTP/2 with bench-latency --grpc-body."""
    idle = pss_kib(mem_pids) / 1024
    h2load(port, 2000, body_file)
    cpu0 = cpu_seconds(cpu_pids)
    with PeakMemory(mem_pids) as mem:
        rps, ok = h2load(port, requests, body_file)
    cpu = cpu_seconds(cpu_pids) - cpu0
    peak = mem.peak / 1024
    if ok < requests:
        raise RuntimeError(f"grpc {kind}: {requests - ok} failed calls under load")
    lat = latency(port, rate, seconds, path="demo.users.v1.UserService/GetUser", grpc_body=body_file)
    if lat["errors"]:
        raise RuntimeError(f"grpc {kind}: {lat['errors']} failed calls at {rate} req/s")
    return {"rps": rps, "cpu_us": cpu / ok * 1e6 if cpu_pids else 0.0, "p50": lat["p50_us"],
            "p99": lat["p99_us"], "p999": lat["p999_us"], "rss_idle": idle, "rss_load": peak}


def interleave(args, tmp, http_res, http_kinds, http_port, grpc_res=None, grpc_kinds=(), grpc_port=None,
               body_file=None, load=None, after=None, wide=0):
    """Runs every round: each HTTP/1.1 topology in turn against `http_port`, then each gRPC one
    against `grpc_port`, a fresh start for every measurement. `load(kind)` gives the HTTP
    (connections, rate) when a topology needs other than the arguments'; `after(kind)` runs once
    a topology has stopped; `wide`: HTTP/1.1 is also measured at that many connections."""
    for rnd in range(1, args.rounds + 1):
        for proto, res, kinds, port in (("http", http_res, http_kinds, http_port),
                                        ("grpc", grpc_res, grpc_kinds, grpc_port)):
            for kind in kinds:
                procs = Procs(tmp)
                try:
                    front, cpu_pids, mem_pids = start_with_retry(kind, procs, tmp, port, grpc=proto == "grpc")
                    if proto == "http":
                        connections, rate = load(kind) if load else (args.connections, args.rate)
                        m = measure_http(kind, front, cpu_pids, mem_pids, connections, args.seconds, rate,
                                         wide)
                    else:
                        m = measure_grpc(kind, front, cpu_pids, mem_pids, body_file, args.grpc_requests, args.seconds,
                                         args.rate)
                    record(res, kind, m, rnd, proto + " ")
                finally:
                    procs.stop()
                    if after:
                        after(kind)


def nginx_backend(tmp):
    """The HTTP/1.1 backend every topology fronts: nginx answering `200 ok`, on the server core."""
    backend = Procs(tmp)
    port = free_port()
    backend.start(["nginx", "-c", nginx_conf(tmp, "backend", port), "-p", tmp], name="backend")
    wait_port(port)
    return backend, port


def record(res, kind, m, rnd, label=""):
    for key, value in m.items():
        res[kind].setdefault(key, []).append(value)
    wide = (f"  wide {m['rps_wide']:9.0f} req/s cpu {m['cpu_us_wide']:7.1f} us/req" if "rps_wide" in m else "")
    print(f"round {rnd} {label}{kind:26} {m['rps']:9.0f} req/s  cpu {m['cpu_us']:7.1f} us/req  "
          f"p50 {m['p50']} us  p99 {m['p99']} us  p99.9 {m['p999']} us  pss {m['rss_idle']:.1f}/{m['rss_load']:.1f} MiB"
          + wide, flush=True)


HEADER = """# Benchmarks

Every figure here comes from `bench/run.sh` in this repository; re-run it to check them.
"""


def replace_section(path, name, body):
    """Replaces the text between `<!-- name -->` and `<!-- /name -->` in `path`."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = open(path).read() if os.path.exists(path) else HEADER
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def multiplexing(args):
    """The mTLS pair with HTTP/1.x multiplexed between the proxies (the default) and without
    (`--http1-multiplex=false`), interleaved, at --connections and --wide client connections."""
    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    kinds = ["sidemesh-2-mtls", "sidemesh-2-mtls-h1"]
    res = {k: {} for k in kinds}
    backend, backend_port = nginx_backend(tmp)
    try:
        interleave(args, tmp, res, kinds, backend_port, wide=args.wide)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    on, off = kinds
    lines = ["## Multiplexing between the proxies: what it costs", "",
             f"Produced by `bench/run.sh --only multiplex --rounds {args.rounds} --connections {args.connections} "
             f"--wide {args.wide}` on {time.strftime('%Y-%m-%d')}: the suite's Sidemesh mTLS pair with HTTP/1.x "
             "multiplexed over one HTTP/2 connection between A and B (the default), and with "
             "`--http1-multiplex=false` (one TLS connection per concurrent request), interleaved in each round; "
             "medians with the spread over rounds, ratios of the same round.", "",
             "| clients | CPU us per request, multiplexed | one connection per request | multiplexed / not | "
             "req/s, multiplexed | not |", "|---|---|---|---|---|---|"]
    for label, cpu, rps in ((args.connections, "cpu_us", "rps"), (args.wide, "cpu_us_wide", "rps_wide")):
        ratio = "{:.2f}x ({:.2f}-{:.2f})".format(*per_round(res, on, off, cpu))
        lines.append(f"| {label} | {fmt_spread(res[on][cpu], '{:.1f}')} | {fmt_spread(res[off][cpu], '{:.1f}')} | "
                     f"{ratio} | {fmt_spread(res[on][rps])} | {fmt_spread(res[off][rps])} |")
    replace_section(args.out, "multiplex", "\n".join(lines))
    print("\n".join(lines))


def control_plane(args):
    """Simulated proxies against the real control plane (tests/src/bin/bench-control-plane.rs)."""
    out = subprocess.run([os.path.join(REL, "bench-control-plane"), "--proxies", args.cp_proxies, "--changes",
                          str(args.cp_changes)], capture_output=True, text=True, check=True, preexec_fn=raise_nofile).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    lines = [f"## Control plane", "",
             f"Produced by `bench/run.sh --only control-plane` on {time.strftime('%Y-%m-%d')}: simulated proxies "
             "(gRPC streams from one process, 100 per HTTP/2 connection) against the real `sidemesh-control-plane`, "
             f"{args.cp_changes} config changes each (a 21-service, 20-route mesh). \"Write to ACK\" runs from the "
             "YAML file's replacement to each proxy's ACK, so it includes the store's poll (100 ms) and debounce "
             "(100 ms) on purpose: that is what an operator waits. Medians over the changes.", "",
             "| proxies | connect all | write to ACK p50 | p99 | last ACK (max) | CP RSS idle | CP RSS connected | CP RSS peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['proxies']} | {r['connect_all_ms']} ms | {r['write_to_ack_p50_ms']:.0f} ms | "
                     f"{r['write_to_ack_p99_ms']:.0f} ms | {r['write_to_last_ack_ms']:.0f} ms "
                     f"({r['write_to_last_ack_max_ms']:.0f} ms) | {r['cp_rss_idle_mib']:.1f} MiB | "
                     f"{r['cp_rss_connected_mib']:.1f} MiB | {r['cp_rss_peak_mib']:.1f} MiB |")
    lines += ["", "For reference, Istio documents istiod at 1 vCPU and 1.5 GB of memory for 2,000 sidecars. Views are "
              "computed once per revision for all replicas of a service, so push cost grows with the number of "
              "distinct services, not proxies."]
    replace_section(args.out, "control-plane", "\n".join(lines))
    print("\n".join(lines))


def policies(args):
    """The cost of a rate limit and a retry policy that are configured but never trigger."""
    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    kinds = ["direct", "sidemesh-1", "sidemesh-1-policies"]
    res = {k: {} for k in kinds}
    backend, backend_port = nginx_backend(tmp)
    try:
        interleave(args, tmp, res, kinds, backend_port)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    plain, guarded = res["sidemesh-1"], res["sidemesh-1-policies"]
    cpu_ratio = [g / p for g, p in zip(guarded["cpu_us"], plain["cpu_us"])]
    rps_ratio = [g / p for g, p in zip(guarded["rps"], plain["rps"])]
    lines = ["## Cost of policies", "",
             f"Produced by `bench/run.sh --only policies --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}: one "
             "proxy in front of the nginx backend, without policies and with a route that has a rate limit "
             "(1,000,000/s, never reached) and a retry policy (3 attempts; nothing fails), interleaved; same "
             "pinning and tools as the data-plane section.", "",
             "| topology | req/s | CPU us/req | p50 us at 1000 req/s |", "|---|---|---|---|"]
    for kind in kinds:
        r = res[kind]
        lines.append(f"| {kind} | {fmt_spread(r['rps'])} | "
                     f"{fmt_spread(r['cpu_us'], '{:.1f}') if kind != 'direct' else '-'} | {fmt_spread(r['p50'])} |")
    medians = statistics.median(guarded["cpu_us"]) / statistics.median(plain["cpu_us"])
    lines += ["", f"With both policies configured, a proxy uses **{medians:.2f}x** the CPU per request of the same "
              f"proxy without them (ratio of the medians; per-round ratios: median {statistics.median(cpu_ratio):.2f}, "
              f"spread {min(cpu_ratio):.2f}-{max(cpu_ratio):.2f}) and serves {statistics.median(rps_ratio):.2f}x the "
              f"throughput (per-round spread {min(rps_ratio):.2f}-{max(rps_ratio):.2f}). A wide spread means the "
              "shared machine was busy during some rounds; re-run with more `--rounds`."]
    replace_section(args.out, "policies", "\n".join(lines))
    print("\n".join(lines))


COLLECTOR_PORT = 0  # set by start_collector() before any tracing topology starts
TRACE_KINDS = ["sidemesh-2", "sidemesh-2-trace-100", "sidemesh-2-trace-1"]


def rotel_agent():
    out = subprocess.run(["python3", "-c", "import rotel, os; print(os.path.dirname(rotel.__file__))"],
                         capture_output=True, text=True)
    path = os.path.join(out.stdout.strip(), "rotel-agent")
    if out.returncode != 0 or not os.path.exists(path):
        sys.exit("the tracing benchmark needs rotel (pip install rotel) as its OTLP collector")
    return path


def tracing(args):
    """Two proxies with tracing off, at 100 % and at 1 % sampling, exporting to a real OTLP
    collector (rotel, discarding what it receives)."""
    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    res = {k: {} for k in TRACE_KINDS}
    backend, backend_port = nginx_backend(tmp)
    try:
        start_collector(backend, tmp)
        interleave(args, tmp, res, TRACE_KINDS, backend_port)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    off = res["sidemesh-2"]
    lines = ["## Cost of tracing", "",
             f"Produced by `bench/run.sh --only tracing --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}: two "
             "proxies (static config, plaintext) in front of the nginx backend, without tracing and with every "
             "request traced at sampling 1.0 and 0.01, exporting over OTLP/gRPC to a real collector (rotel, "
             "discarding what it receives, on the proxies' core); same tools and pinning as above.", "",
             "| topology | req/s | vs off | CPU us/req | vs off | p50 us at 1000 req/s |", "|---|---|---|---|---|---|"]
    for kind in TRACE_KINDS:
        r = res[kind]
        rps_ratio = [a / b for a, b in zip(r["rps"], off["rps"])]
        cpu_ratio = [a / b for a, b in zip(r["cpu_us"], off["cpu_us"])]
        lines.append(f"| {kind} | {fmt_spread(r['rps'])} | {statistics.median(rps_ratio):.2f}x | "
                     f"{fmt_spread(r['cpu_us'], '{:.1f}')} | {statistics.median(cpu_ratio):.2f}x | {fmt_spread(r['p50'])} |")
    lines += ["", "Ratios are medians of per-round ratios against tracing off in the same round. At 1.0 every request "
              "makes two spans (one per proxy), which are batched and exported by a task of their own; at 0.01 the "
              "cost is the sampling decision, the context written upstream, and one span in a hundred."]
    replace_section(args.out, "tracing", "\n".join(lines))
    print("\n".join(lines))


MTLS_KINDS = ["direct", "sidemesh-2", "sidemesh-2-mtls", "nginx-2-mtls", "haproxy-2-mtls"]
NOREUSE_KINDS = ["sidemesh-2-mtls-noreuse", "nginx-2-mtls-noreuse", "haproxy-2-mtls-noreuse"]


def mtls(args):
    """Two proxies with mutual TLS between them, against plaintext and against an nginx pair and a
    HAProxy pair doing the same mTLS hop; then the handshake cost, with connection reuse switched off."""
    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    kinds = MTLS_KINDS + NOREUSE_KINDS
    res = {k: {} for k in kinds}
    backend, backend_port = nginx_backend(tmp)
    # Without reuse every request is a handshake: fewer connections and a lower rate, or the
    # pair saturates one core (and ephemeral ports) long before the proxies matter; and a pause
    # after each, to let TIME_WAIT sockets age a little.
    try:
        interleave(args, tmp, res, kinds, backend_port,
                   load=lambda kind: (8, 200) if kind in NOREUSE_KINDS else (args.connections, args.rate),
                   after=lambda kind: time.sleep(2) if kind in NOREUSE_KINDS else None)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a, b, key):
        per_round = [x / y for x, y in zip(res[a][key], res[b][key]) if y]
        return statistics.median(per_round), min(per_round), max(per_round)

    def added(kind, key):
        return statistics.median([x - d for x, d in zip(res[kind][key], res["direct"][key])])

    lines = ["## Mutual TLS", "",
             f"Produced by `bench/run.sh --only mtls --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}. "
             "Every topology fronts the same nginx backend; the second hop (A -> B) is mutual TLS 1.3 with "
             "ECDSA P-256 certificates from a CA in every `-mtls` topology: Sidemesh's own control-plane CA "
             "(rustls, ring), and an openssl-made CA for nginx 1.22 and HAProxy 2.6 (Debian 12, OpenSSL 3.0). "
             f"wrk: 1 thread, {args.connections} connections, {args.seconds}s; latency: `bench-latency` at "
             f"{args.rate} req/s (open loop); load generator on core 0, everything else on core 1; "
             "topologies interleaved in each round; medians with the spread over rounds.", "",
             "| topology | req/s | CPU us/req (both proxies) | p50 us | p99 us |", "|---|---|---|---|---|"]
    for kind in MTLS_KINDS:
        r = res[kind]
        lines.append(f"| {kind} | {fmt_spread(r['rps'])} | "
                     f"{fmt_spread(r['cpu_us'], '{:.1f}') if kind != 'direct' else '-'} | "
                     f"{fmt_spread(r['p50'])} | {fmt_spread(r['p99'])} |")
    ng, hp = ratio("sidemesh-2-mtls", "nginx-2-mtls", "cpu_us"), ratio("sidemesh-2-mtls", "haproxy-2-mtls", "cpu_us")
    tls_cost = ratio("sidemesh-2-mtls", "sidemesh-2", "cpu_us")
    thr_ng = ratio("sidemesh-2-mtls", "nginx-2-mtls", "rps")
    thr_hp = ratio("sidemesh-2-mtls", "haproxy-2-mtls", "rps")
    lines += ["",
              f"- CPU per request, Sidemesh mTLS pair vs nginx mTLS pair: **{ng[0]:.2f}x** (spread {ng[1]:.2f}-{ng[2]:.2f}); "
              f"vs HAProxy mTLS pair: **{hp[0]:.2f}x** ({hp[1]:.2f}-{hp[2]:.2f}).",
              f"- Throughput at {args.connections} connections: {thr_ng[0]:.2f}x the nginx pair's, "
              f"{thr_hp[0]:.2f}x the HAProxy pair's.",
              f"- mTLS costs the Sidemesh pair {tls_cost[0]:.2f}x its plaintext CPU per request "
              f"({tls_cost[1]:.2f}-{tls_cost[2]:.2f}).",
              f"- Added latency over direct at {args.rate} req/s (medians): Sidemesh mTLS +{added('sidemesh-2-mtls', 'p50'):.0f} us p50, "
              f"+{added('sidemesh-2-mtls', 'p99'):.0f} us p99; nginx +{added('nginx-2-mtls', 'p50'):.0f} us / "
              f"+{added('nginx-2-mtls', 'p99'):.0f} us; HAProxy +{added('haproxy-2-mtls', 'p50'):.0f} us / "
              f"+{added('haproxy-2-mtls', 'p99'):.0f} us.", "",
              "### Handshake cost (no connection reuse)", "",
              "The A -> B connection is closed after every request (Sidemesh: `--max-idle-per-endpoint 0`; nginx: "
              "no upstream keepalive; HAProxy: `http-reuse never`), so each request pays a TCP connect and a TLS "
              "handshake (resumed from a session ticket when the client has one, each proxy's default). "
              "8 connections; latency at 200 req/s.", "",
              "| topology | req/s | CPU us/req | p50 us | p99 us | CPU us per handshake (vs reuse) |",
              "|---|---|---|---|---|---|"]
    for kind in NOREUSE_KINDS:
        r = res[kind]
        reused = kind.replace("-noreuse", "")
        per_handshake = statistics.median(r["cpu_us"]) - statistics.median(res[reused]["cpu_us"])
        lines.append(f"| {kind} | {fmt_spread(r['rps'])} | {fmt_spread(r['cpu_us'], '{:.1f}')} | "
                     f"{fmt_spread(r['p50'])} | {fmt_spread(r['p99'])} | {per_handshake:.0f} |")
    lines += ["", "Debian 12's OpenSSL 3.0 is known for slow handshakes (its decoder and locking overhead), which "
              "dominates the nginx and HAProxy rows without reuse; with reuse, the handshake is paid once per "
              "pooled connection and the table above is what a steady mesh sees."]
    replace_section(args.out, "mtls", "\n".join(lines))
    print("\n".join(lines))


SUITE_KINDS = ["direct", "sidemesh-2", "sidemesh-2-mtls", "sidemesh-2-mtls-full", "nginx-2-mtls", "haproxy-2-mtls"]
SUITE_LABELS = {
    "direct": "direct (no proxy)",
    "sidemesh-2": "Sidemesh pair, plaintext",
    "sidemesh-2-mtls": "Sidemesh pair, mTLS",
    "sidemesh-2-mtls-full": "Sidemesh pair, mTLS + retries + rate limit + tracing 1 %",
    "nginx-2-mtls": "nginx pair, mTLS",
    "haproxy-2-mtls": "HAProxy pair, mTLS",
}


def start_collector(procs, tmp):
    """rotel as the OTLP collector (discarding spans) for the topologies that trace."""
    global COLLECTOR_PORT
    COLLECTOR_PORT = free_port()
    procs.start([rotel_agent(), "start", "--otlp-grpc-endpoint", f"127.0.0.1:{COLLECTOR_PORT}",
                 "--otlp-http-endpoint", f"127.0.0.1:{free_port()}", "--exporter", "blackhole",
                 "--pid-file", os.path.join(tmp, "rotel.pid"), "--log-file", os.path.join(tmp, "rotel.log")],
                name="collector")
    wait_port(COLLECTOR_PORT)


def suite(args):
    """The report's main section: the same HTTP/1.1 and gRPC loads through every topology, with
    every figure compared with the direct call of the same round."""
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs at least 2 cores: one for the load generator, one for the servers")
    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    http = {k: {} for k in SUITE_KINDS}
    grpc = {k: {} for k in SUITE_KINDS}
    body_file = os.path.join(tmp, "getuser.bin")
    with open(body_file, "wb") as f:
        f.write(bytes([0, 0, 0, 0, 2, 0x08, 0x01]))  # gRPC frame: GetUserRequest{id: 1}
    backend = Procs(tmp)
    backend_port, grpc_port = free_port(), free_port()
    backend.start(["nginx", "-c", nginx_conf(tmp, "backend", backend_port), "-p", tmp], name="backend")
    try:
        backend.start([os.path.join(REL, "user-service"), "--listen", f"127.0.0.1:{grpc_port}", "--log-format",
                       "text"], name="user-service")
        start_collector(backend, tmp)
        wait_port(backend_port)
        wait_port(grpc_port)
        interleave(args, tmp, http, SUITE_KINDS, backend_port, grpc, SUITE_KINDS, grpc_port, body_file,
                   wide=args.wide)
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    write_suite(args, http, grpc)


def per_round(res, a, b, key, op=lambda x, y: x / y):
    values = [op(x, y) for x, y in zip(res[a][key], res[b][key]) if y]
    return statistics.median(values), min(values), max(values)


def suite_table(res, args):
    rows = ["| topology | req/s | vs direct | CPU s per 1000 req | vs nginx mTLS pair | vs HAProxy mTLS pair "
            "| p50 us | p99 us | p99.9 us | added p50 us | memory per proxy idle MiB | under load MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in SUITE_KINDS:
        r = res[kind]
        proxied = kind != "direct"
        # Pairs: the figure per proxy is half the pair's (nginx: master and worker together;
        # PSS, so the pages they share count once).
        rss_idle = [v / 2 for v in r["rss_idle"]]
        rss_load = [v / 2 for v in r["rss_load"]]
        cpu_s = [v / 1000 for v in r["cpu_us"]]
        dash = "-"
        vs = lambda peer: "{:.2f}x ({:.2f}-{:.2f})".format(*per_round(res, kind, peer, "cpu_us")) if proxied else dash
        rows.append(
            f"| {SUITE_LABELS[kind]} | {fmt_spread(r['rps'])} | "
            f"{'{:.2f}x'.format(per_round(res, kind, 'direct', 'rps')[0])} | "
            f"{fmt_spread(cpu_s, '{:.3f}') if proxied else dash} | {vs('nginx-2-mtls')} | {vs('haproxy-2-mtls')} | "
            f"{fmt_spread(r['p50'])} | {fmt_spread(r['p99'])} | {fmt_spread(r['p999'])} | "
            f"{'{:+.0f}'.format(per_round(res, kind, 'direct', 'p50', lambda x, y: x - y)[0]) if proxied else dash} | "
            f"{fmt_spread(rss_idle, '{:.1f}') if proxied else dash} | {fmt_spread(rss_load, '{:.1f}') if proxied else dash} |")
    return rows


def wide_table(res, args):
    rows = [f"| topology | req/s at {args.wide} connections | vs direct | CPU s per 1000 req | vs nginx mTLS pair "
            "| vs HAProxy mTLS pair | under load MiB |", "|---|---|---|---|---|---|---|"]
    for kind in SUITE_KINDS:
        r = res[kind]
        proxied = kind != "direct"
        vs = lambda peer: ("{:.2f}x ({:.2f}-{:.2f})".format(*per_round(res, kind, peer, "cpu_us_wide"))
                           if proxied else "-")
        rows.append(
            f"| {SUITE_LABELS[kind]} | {fmt_spread(r['rps_wide'])} | "
            f"{'{:.2f}x'.format(per_round(res, kind, 'direct', 'rps_wide')[0])} | "
            f"{fmt_spread([v / 1000 for v in r['cpu_us_wide']], '{:.3f}') if proxied else '-'} | {vs('nginx-2-mtls')} | "
            f"{vs('haproxy-2-mtls')} | {fmt_spread([v / 2 for v in r['rss_load_wide']], '{:.1f}') if proxied else '-'} |")
    return rows


def write_suite(args, http, grpc):
    command = (f"bench/run.sh --rounds {args.rounds} --seconds {args.seconds} --connections {args.connections} "
               f"--wide {args.wide} --rate {args.rate} --grpc-requests {args.grpc_requests}")
    lines = ["## Sidemesh against direct calls, nginx and HAProxy", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores; `bench/run.sh` alone "
             "runs 3 rounds with the other values as here). The script installs nginx, HAProxy, wrk and h2load from Debian, builds release "
             "binaries, and writes this section.", "",
             "Every topology fronts the same backend: nginx answering `200 ok` for HTTP/1.1, the demo user-service "
             "for gRPC. The load generator runs on core 0, everything else on core 1 (`taskset`); topologies are "
             f"interleaved in each of {args.rounds} rounds; each cell is the median with the spread (min-max) over "
             "rounds, and every ratio is a median of per-round ratios, so a noisy round moves both sides of it. "
             "CPU is the proxies' own CPU time (both proxies of a pair, all their processes) per request, from "
             "/proc. Pairs: A -> B -> backend, where A -> B is mutual TLS 1.3 with ECDSA P-256 certificates "
             "(Sidemesh: its control plane's CA, SPIFFE identities checked; nginx 1.22 and HAProxy 2.6 on "
             "OpenSSL 3.0: an openssl-made CA, names checked). The `full` Sidemesh row also has a route with "
             "retries (3 attempts, gRPC calls included), a rate limit (far above the load) and tracing at 1 % "
             "sampling exporting to a real collector (rotel, on core 1, its CPU not counted).", "",
             "### HTTP/1.1", "",
             f"Throughput: `wrk -t1 -c{args.connections} -d{args.seconds}s` (the maximum at that many connections). "
             f"Latency: `bench-latency --rate {args.rate}` for {args.seconds}s, open loop, measured from each request's "
             "scheduled time. Memory is PSS (proportional set size: pages shared between processes, such as "
             "nginx's master and worker, count once), idle before the first request and at its peak "
             "during wrk, sampled every 100 ms.", ""]
    lines += suite_table(http, args)
    if args.wide:
        lines += ["", f"The same topologies under `wrk -t1 -c{args.wide} -d{args.seconds}s` (started as above; "
                  "memory is the peak PSS per proxy during this load):", ""]
        lines += wide_table(http, args)
    lines += ["", "### gRPC", "",
              f"Throughput: `h2load -n {args.grpc_requests} -c 4 -m 16` of `demo.users.v1.UserService/GetUser`. "
              f"Latency: unary calls at {args.rate} per second over HTTP/2 (`bench-latency --grpc-body`), success "
              "meaning `grpc-status: 0`.", ""]
    lines += suite_table(grpc, args)
    h = lambda a, b, key="cpu_us": per_round(http, a, b, key)
    g = lambda a, b, key="cpu_us": per_round(grpc, a, b, key)
    add = lambda res, kind, key: per_round(res, kind, "direct", key, lambda x, y: x - y)[0]
    full_rss = statistics.median(http["sidemesh-2-mtls-full"]["rss_load"]) / 2
    lines += ["", "### Headline", "",
              f"- **CPU per request, mTLS hop** (HTTP/1.1): the Sidemesh pair uses **{h('sidemesh-2-mtls', 'nginx-2-mtls')[0]:.2f}x** "
              f"the nginx pair's and **{h('sidemesh-2-mtls', 'haproxy-2-mtls')[0]:.2f}x** the HAProxy pair's; with "
              f"retries, a rate limit and tracing at 1 %, **{h('sidemesh-2-mtls-full', 'nginx-2-mtls')[0]:.2f}x** and "
              f"**{h('sidemesh-2-mtls-full', 'haproxy-2-mtls')[0]:.2f}x**. gRPC: {g('sidemesh-2-mtls', 'nginx-2-mtls')[0]:.2f}x "
              f"and {g('sidemesh-2-mtls', 'haproxy-2-mtls')[0]:.2f}x ({g('sidemesh-2-mtls-full', 'nginx-2-mtls')[0]:.2f}x and "
              f"{g('sidemesh-2-mtls-full', 'haproxy-2-mtls')[0]:.2f}x with the policies)."
              + (f" At {args.wide} connections (HTTP/1.1): **{h('sidemesh-2-mtls', 'nginx-2-mtls', 'cpu_us_wide')[0]:.2f}x** "
                 f"and **{h('sidemesh-2-mtls', 'haproxy-2-mtls', 'cpu_us_wide')[0]:.2f}x**." if args.wide else ""),
              f"- **Added latency at the median** over a direct call, at {args.rate} req/s: Sidemesh mTLS "
              f"{add(http, 'sidemesh-2-mtls', 'p50'):+.0f} us (HTTP/1.1), {add(grpc, 'sidemesh-2-mtls', 'p50'):+.0f} us (gRPC); "
              f"nginx {add(http, 'nginx-2-mtls', 'p50'):+.0f} / {add(grpc, 'nginx-2-mtls', 'p50'):+.0f} us; "
              f"HAProxy {add(http, 'haproxy-2-mtls', 'p50'):+.0f} / {add(grpc, 'haproxy-2-mtls', 'p50'):+.0f} us. "
              f"The tails (HTTP/1.1 p99.9: direct {statistics.median(http['direct']['p999']):.0f} us, Sidemesh "
              f"{statistics.median(http['sidemesh-2-mtls']['p999']):.0f} us, nginx "
              f"{statistics.median(http['nginx-2-mtls']['p999']):.0f} us, HAProxy "
              f"{statistics.median(http['haproxy-2-mtls']['p999']):.0f} us) move with the shared machine more than "
              "with the proxies: compare their spreads before reading anything into them.",
              f"- **Throughput**, as a share of direct at {args.connections} connections: Sidemesh mTLS "
              f"{h('sidemesh-2-mtls', 'direct', 'rps')[0]:.2f}x, nginx {h('nginx-2-mtls', 'direct', 'rps')[0]:.2f}x, "
              f"HAProxy {h('haproxy-2-mtls', 'direct', 'rps')[0]:.2f}x (gRPC: {g('sidemesh-2-mtls', 'direct', 'rps')[0]:.2f}x, "
              f"{g('nginx-2-mtls', 'direct', 'rps')[0]:.2f}x, {g('haproxy-2-mtls', 'direct', 'rps')[0]:.2f}x).",
              f"- **Memory**: {full_rss:.1f} MiB peak PSS per Sidemesh proxy under load with every policy on "
              f"(idle {statistics.median(http['sidemesh-2-mtls-full']['rss_idle']) / 2:.1f} MiB).",
              f"- **Policies**: mTLS with retries, a rate limit and 1 % tracing costs "
              f"{h('sidemesh-2-mtls-full', 'sidemesh-2-mtls')[0]:.2f}x the CPU per request of bare mTLS, which costs "
              f"{h('sidemesh-2-mtls', 'sidemesh-2')[0]:.2f}x plaintext."]
    replace_section(args.out, "suite", "\n".join(lines))
    print("\n".join(lines))


def fmt_spread(values, fmt="{:.0f}"):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--wide", type=int, default=256,
                    help="the suite: also measure HTTP/1.1 throughput and CPU at this many connections (0: not)")
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--grpc-requests", type=int, default=40000)
    ap.add_argument("--only", choices=["suite", "data-plane", "control-plane", "policies", "mtls", "tracing",
                                       "profile", "multiplex"],
                    help="one section (default: the suite, the report's main section)")
    ap.add_argument("--all", action="store_true", help="every section, the suite first")
    ap.add_argument("--cp-proxies", default="1000,10000")
    ap.add_argument("--cp-changes", type=int, default=5)
    ap.add_argument("--before", help="profile: also profile the binaries in this folder (an earlier build)")
    ap.add_argument("--requests", type=int, default=50000, help="profile: requests counted for syscalls")
    ap.add_argument("--cg-requests", type=int, default=5000, help="profile: requests counted under callgrind")
    args = ap.parse_args()
    if args.only == "profile":
        import cost_profile  # bench/cost_profile.py
        cost_profile.profile(args)
        return
    if args.all:
        for section in (suite, data_plane, control_plane, policies, mtls, tracing):
            section(args)
        return
    if args.only in (None, "suite"):
        suite(args)
        return
    if args.only == "policies":
        policies(args)
        return
    if args.only == "multiplex":
        multiplexing(args)
        return
    if args.only == "mtls":
        mtls(args)
        return
    if args.only == "tracing":
        tracing(args)
        return
    if args.only == "control-plane":
        control_plane(args)
        return
    data_plane(args)


def data_plane(args):
    """Plaintext hops: one and two Sidemesh proxies against nginx and HAProxy pairs, and idle
    connections' memory."""
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs at least 2 cores: one for the load generator, one for the servers")

    tmp = tempfile.mkdtemp(prefix="sidemesh-bench-")
    http_kinds = ["direct", "sidemesh-1", "sidemesh-2", "nginx-2", "haproxy-2"]
    grpc_kinds = ["direct", "sidemesh-1", "sidemesh-2"]
    results = {k: {} for k in http_kinds}
    grpc = {k: {} for k in grpc_kinds}
    body_file = os.path.join(tmp, "getuser.bin")
    with open(body_file, "wb") as f:
        f.write(bytes([0, 0, 0, 0, 2, 0x08, 0x01]))  # gRPC frame: GetUserRequest{id: 1}

    backend = Procs(tmp)
    backend_port = free_port()
    backend.start(["nginx", "-c", nginx_conf(tmp, "backend", backend_port), "-p", tmp], name="backend")
    grpc_port = free_port()
    backend.start([os.path.join(REL, "user-service"), "--listen", f"127.0.0.1:{grpc_port}", "--log-format", "text"],
                  name="user-service")
    wait_port(backend_port)
    wait_port(grpc_port)
    try:
        interleave(args, tmp, results, http_kinds, backend_port, grpc, grpc_kinds, grpc_port, body_file)
        idle = idle_connections(tmp, backend_port, args.idle)
        idle_before, idle_after = idle["before"], idle["held"]
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    write_report(args, results, grpc, idle_before, idle_after)


def write_report(args, results, grpc, idle_before, idle_after):
    direct = results["direct"]
    rounds = args.rounds
    lines = []
    w = lines.append
    w("## Data plane")
    w("")
    w("Produced by `bench/run.sh --only data-plane` (" + " ".join(f"--{k} {v}" for k, v in
      [("rounds", args.rounds), ("seconds", args.seconds), ("connections", args.connections),
       ("rate", args.rate), ("idle", args.idle)]) + f") on {time.strftime('%Y-%m-%d')}, "
      f"{os.cpu_count()} cores. Re-run it to reproduce; figures move with the machine, ratios much less.")
    w("")
    w("Setup: the same nginx backend (`return 200`) behind every topology. Load generator on core 0, "
      "every server process (backend and proxies) on core 1; one worker thread or process per proxy. "
      f"Each figure is the median of {rounds} interleaved rounds, with the spread (min-max) in brackets. "
      "CPU is the proxies' own CPU time per request (both proxies of a pair), from /proc.")
    w("")
    w("### HTTP/1.1")
    w("")
    w(f"Throughput: `wrk -t1 -c{args.connections} -d{args.seconds}s`. Latency: `bench-latency --rate {args.rate}` "
      "(open loop, measured from each request's scheduled time).")
    w("")
    w("| topology | req/s | vs direct | CPU us/req | cores at 1000 req/s | p50 us | p99 us | p99.9 us | added p50 us | added p99 us | PSS idle MiB | PSS peak MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, r in results.items():
        ratio = [a / b for a, b in zip(r["rps"], direct["rps"])]
        added50 = [a - b for a, b in zip(r["p50"], direct["p50"])]
        added99 = [a - b for a, b in zip(r["p99"], direct["p99"])]
        cores = [c * 1000 / 1e6 for c in r["cpu_us"]]
        w(f"| {kind} | {fmt_spread(r['rps'])} | {fmt_spread(ratio, '{:.2f}')} | "
          f"{fmt_spread(r['cpu_us'], '{:.1f}') if kind != 'direct' else '-'} | "
          f"{fmt_spread(cores, '{:.3f}') if kind != 'direct' else '-'} | "
          f"{fmt_spread(r['p50'])} | {fmt_spread(r['p99'])} | {fmt_spread(r['p999'])} | "
          f"{fmt_spread(added50) if kind != 'direct' else '-'} | {fmt_spread(added99) if kind != 'direct' else '-'} | "
          f"{fmt_spread(r['rss_idle'], '{:.1f}') if kind != 'direct' else '-'} | "
          f"{fmt_spread(r['rss_load'], '{:.1f}') if kind != 'direct' else '-'} |")
    w("")
    sm, ng, hp = results["sidemesh-2"], results["nginx-2"], results["haproxy-2"]
    cpu_vs_nginx = [a / b for a, b in zip(sm["cpu_us"], ng["cpu_us"])]
    cpu_vs_haproxy = [a / b for a, b in zip(sm["cpu_us"], hp["cpu_us"])]
    w("Headline, two-proxy hop (plaintext): Sidemesh uses "
      f"**{statistics.median(cpu_vs_nginx):.2f}x** the CPU per request of the nginx pair "
      f"(spread {min(cpu_vs_nginx):.2f}-{max(cpu_vs_nginx):.2f}) and "
      f"**{statistics.median(cpu_vs_haproxy):.2f}x** that of the HAProxy pair "
      f"(spread {min(cpu_vs_haproxy):.2f}-{max(cpu_vs_haproxy):.2f}); it adds "
      f"**{statistics.median([a - b for a, b in zip(sm['p50'], direct['p50'])]):.0f} us** at the median over a direct "
      f"call at {args.rate} req/s (p99: {statistics.median(sm['p99']):.0f} us against {statistics.median(direct['p99']):.0f} us "
      "direct; at this rate the p99 of both is dominated by the shared machine's noise, see the spread), with "
      f"{statistics.median(sm['rss_load']) / 2:.1f} MiB peak PSS per proxy.")
    w("")
    w("### gRPC")
    w("")
    w("`h2load -n 40000 -c 4 -m 16` of `demo.users.v1.UserService/GetUser` against the demo user-service.")
    w("")
    w("| topology | req/s | vs direct | CPU us/req |")
    w("|---|---|---|---|")
    for kind, r in grpc.items():
        ratio = [a / b for a, b in zip(r["rps"], grpc["direct"]["rps"])]
        w(f"| {kind} | {fmt_spread(r['rps'])} | {fmt_spread(ratio, '{:.2f}')} | "
          f"{fmt_spread(r['cpu_us'], '{:.1f}') if kind != 'direct' else '-'} |")
    w("")
    w("### Idle connections")
    w("")
    per_conn = (idle_after - idle_before) / args.idle
    w(f"One proxy holding {args.idle} idle keep-alive client connections (each made one request): RSS "
      f"{idle_before / 1024:.1f} MiB before, {idle_after / 1024:.1f} MiB after, about **{per_conn:.1f} KiB per idle "
      "connection** (hyper's per-connection read and write buffers and the connection task). Connections are capped "
      "per listener by `--max-connections` (default 20000), so memory stays bounded.")
    w("")
    replace_section(args.out, "data-plane", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
