#!/usr/bin/env python3
"""The cost of policies in instructions, which do not depend on how busy the machine is.

Runs one proxy under `valgrind --tool=callgrind` twice per config (no requests, then N
sequential keep-alive requests) so that start-up and shutdown cancel out, and reports user-space
instructions per request with and without a rate limit plus a retry policy that never trigger.
Kernel work (the larger part of a proxy's CPU) is not counted: this isolates what the policies add.

    python3 bench/policy_instructions.py [--requests 2000]
"""

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the data-plane benchmark's helpers)


def instructions(tmp, yaml_path, requests):
    port = run.free_port()
    out = os.path.join(tmp, f"cg-{port}.out")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             os.path.join(run.REL, "sidemesh-proxy"), "--config", yaml_path, "--service", "client",
                             "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "text",
                             "--upstream", f"backend=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"))
    run.wait_port(port, timeout=60)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(requests):
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"unexpected {resp.status}")
    conn.close()
    time.sleep(0.5)
    proc.terminate()
    proc.wait(timeout=60)
    with open(out) as f:
        for line in f:
            m = re.match(r"(summary|totals):\s+(\d+)", line)
            if m:
                return int(m.group(2))
    raise RuntimeError("no callgrind totals")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", default=os.path.join(run.ROOT, "BENCHMARKS.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sidemesh-cg-")
    backend = run.Procs(tmp)
    backend_port = run.free_port()
    backend.start(["nginx", "-c", run.nginx_conf(tmp, "backend", backend_port), "-p", tmp], name="backend")
    run.wait_port(backend_port)
    per_request = {}
    try:
        for name, extra in [("plain", ""), ("policies", run.POLICIES)]:
            yaml_path = run.mesh_yaml(tmp, f"cg-{name}", backend_port, extra)
            idle = instructions(tmp, yaml_path, 0)
            loaded = instructions(tmp, yaml_path, args.requests)
            per_request[name] = (loaded - idle) / args.requests
            print(f"{name}: {per_request[name]:.0f} instructions per request", flush=True)
    finally:
        backend.stop()
    ratio = per_request["policies"] / per_request["plain"]
    body = "\n".join([
        "### Policies in instructions",
        "",
        f"Produced by `python3 bench/policy_instructions.py --requests {args.requests}` on {time.strftime('%Y-%m-%d')}: "
        "user-space instructions per request of one proxy (callgrind; start-up subtracted), which no noisy neighbour "
        "can move. Kernel time, the larger part of a proxy's CPU, is not in these counts.",
        "",
        "| config | instructions per request |",
        "|---|---|",
        f"| no policies | {per_request['plain']:.0f} |",
        f"| rate limit + retry policy (not triggering) | {per_request['policies']:.0f} |",
        "",
        f"The policies add **{(ratio - 1) * 100:.0f} %** to the proxy's own instructions per request "
        f"({per_request['policies'] - per_request['plain']:.0f} instructions).",
    ])
    run.replace_section(args.out, "policies-instructions", body)
    print(body)


if __name__ == "__main__":
    main()
