"""Deterministic per-request costs of the Sidemesh pair: `bench/run.sh --only profile`.

Timed benchmarks move with the machine; counts do not. For the plaintext and the mTLS pair
(`sidemesh-2`, `sidemesh-2-mtls` of run.py, the same processes and flags), with `h2load --h1`
sending a fixed number of HTTP/1.1 requests on a fixed number of client connections:

- instructions per request in user space, per proxy, from callgrind (the proxies run under
  `valgrind --tool=callgrind --instr-atstart=no`; instrumentation is switched on after a warm-up,
  so start-up, the handshakes and pool warm-up are not counted), and the functions where they go;
- syscalls per request, per proxy and by syscall, from `perf trace -s` attached after the
  warm-up (nginx and HAProxy mTLS pairs beside them for scale).

`--before DIR` profiles another build too (a `target/release` folder of an earlier commit), so one
run shows before and after side by side.
"""

import collections
import os
import re
import signal
import subprocess
import tempfile
import time

import run

KINDS = ("sidemesh-2", "sidemesh-2-mtls")
PEERS = ("nginx-2-mtls", "haproxy-2-mtls")


def h1load(port, requests, connections):
    """`requests` HTTP/1.1 GETs on `connections` keep-alive connections; returns the failures."""
    out = subprocess.run(["taskset", "-c", run.LOAD_CORE, "h2load", "--h1", "-n", str(requests), "-c",
                          str(connections), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    ok = int(status.group(1)) if status else 0
    if not done or ok != requests:
        raise RuntimeError(f"h2load: {requests - ok} of {requests} requests failed:\n{out}")


def perf_syscalls(pids, action):
    """Runs `action()` with `perf trace -s` attached to every thread of each pid; returns
    {pid: Counter(syscall -> calls)}."""
    tracers = {}
    for pid in pids:
        out = tempfile.NamedTemporaryFile(prefix="perf-trace-", suffix=".txt", delete=False)
        tracers[pid] = (subprocess.Popen(["perf", "trace", "-s", "-o", out.name, "-p", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out.name)
    time.sleep(1.0)  # perf attaches to every thread before the load starts
    try:
        action()
    finally:
        counts = {}
        for pid, (tracer, path) in tracers.items():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
            counts[pid] = parse_perf_summary(open(path).read())
            os.unlink(path)
    return counts


def parse_perf_summary(text):
    """Sums `perf trace -s`'s per-thread tables into one Counter of calls by syscall."""
    calls = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+[\d.]+", line)
        if m:
            calls[m.group(1)] += int(m.group(2))
    return calls


def callgrind_wrap(tmp):
    def wrap(name, args):
        out = os.path.join(tmp, f"callgrind.{name}.out")
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *args]
    return wrap


def callgrind_totals(path):
    """The instruction count of a callgrind dump (`summary:` or `totals:` line)."""
    for line in open(path):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def self_costs(path):
    """callgrind_annotate's self cost per function of a dump, as [(instructions, function)]."""
    out = subprocess.run(["callgrind_annotate", "--threshold=100", "--auto=no", path],
                         capture_output=True, text=True, check=True).stdout
    # The table of functions runs from its `file:function` heading to the next rule; the
    # annotated sources after it repeat the names with call counts.
    table = out.split("file:function", 1)[1].split("\n-", 2)[1]
    rows = []
    for line in table.splitlines():
        m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(?:\?\?\?|[^:]+):(.+?)(?: \[.*\])?$", line)
        if m:
            rows.append((int(m.group(1).replace(",", "")), m.group(2)))
    return rows


def area(function):
    """Which part of the program a function belongs to: the allocator, memcpy, the kernel
    interface, or the crate (for the proxy: its module) whose code it is."""
    if re.search(r"malloc|free|realloc|_int_|tcache|calloc|cfree", function) and "::" not in function:
        return "allocator (malloc, free)"
    if re.search(r"mem(cpy|move|set|cmp)|bcmp|strlen", function) and "::" not in function:
        return "memcpy, memmove, memset"
    name = function.lstrip("<&*")
    if name.startswith(("ring_core", "aes_", "gcm_", "chacha", "ecp_")):
        return "crypto (ring)"
    parts = name.split("::")
    if parts[0] == "sidemesh_proxy" and len(parts) > 2:
        return f"sidemesh_proxy::{parts[1]}"
    if "::" not in name:
        return "libc and the rest"
    return parts[0].split("<")[0]


def areas(path, limit):
    """Self cost grouped by area, the largest `limit`, as (share, area)."""
    total = callgrind_totals(path)
    by_area = collections.Counter()
    for cost, function in self_costs(path):
        by_area[area(function)] += cost
    return [(cost / total, name) for name, cost in by_area.most_common(limit)]


def top_functions(path, limit):
    """The functions with the largest self cost, as (share, name)."""
    total = callgrind_totals(path)
    rows = sorted(self_costs(path), reverse=True)[:limit]
    return [(cost / total, short(function)) for cost, function in rows]


def short(symbol):
    """A demangled Rust path without its generic arguments and hash, shortened to its last parts."""
    depth, out = 0, []
    for ch in symbol:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    name = re.sub(r"::h[0-9a-f]{16}$", "", "".join(out)).strip()
    parts = [p for p in name.split("::") if p]
    return "::".join(parts[-3:]) if parts else symbol[:80]


def profile_build(label, rel, tmp, args):
    """Instructions and syscalls per request for each Sidemesh kind, with binaries from `rel`."""
    run.REL = rel
    results = {}
    for kind in KINDS:
        res = results[kind] = {}
        # Syscalls, at full speed.
        procs = run.Procs(tmp)
        try:
            port, cpu_pids, _ = run.start_with_retry(kind, procs, tmp, args.backend_port)
            h1load(port, 2000, args.connections)
            counts = perf_syscalls(cpu_pids, lambda: h1load(port, args.requests, args.connections))
            res["syscalls"] = [counts[p] for p in cpu_pids]
        finally:
            procs.stop()
        # Instructions, under callgrind.
        cg = os.path.join(tmp, f"cg-{label}-{kind}")
        os.makedirs(cg, exist_ok=True)
        run.WRAP = callgrind_wrap(cg)
        procs = run.Procs(tmp)
        try:
            port, cpu_pids, _ = start_slow(kind, procs, tmp, args.backend_port)
            h1load(port, 500, args.connections)
            for pid in cpu_pids:
                subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True, capture_output=True)
            h1load(port, args.cg_requests, args.connections)
            for pid in cpu_pids:
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
            # Each proxy's dump is the newest file it wrote (its exit writes another, later).
            res["dumps"] = []
            for name in ("proxy-a", "proxy-b"):
                files = [os.path.join(cg, f) for f in os.listdir(cg) if f.startswith(f"callgrind.{name}.out")]
                res["dumps"].append(max(files, key=os.path.getmtime))
        finally:
            run.WRAP = None
            procs.stop()
        res["instructions"] = [callgrind_totals(d) / args.cg_requests for d in res["dumps"]]
        print(f"{label} {kind}: instructions/req {res['instructions']}, syscalls/req "
              f"{[sum(c.values()) / args.requests for c in res['syscalls']]}", flush=True)
    return results


def start_slow(kind, procs, tmp, backend_port):
    """run.start_topology with the patience a proxy under valgrind needs."""
    run.PORT_WAIT = 120.0
    try:
        return run.start_topology(kind, procs, tmp, backend_port)
    finally:
        run.PORT_WAIT = 10.0


def peer_syscalls(tmp, args):
    results = {}
    for kind in PEERS:
        procs = run.Procs(tmp)
        try:
            port, cpu_pids, _ = run.start_with_retry(kind, procs, tmp, args.backend_port)
            h1load(port, 2000, args.connections)
            counts = perf_syscalls(cpu_pids, lambda: h1load(port, args.requests, args.connections))
            total = collections.Counter()
            for c in counts.values():
                total.update(c)
            results[kind] = total
        finally:
            procs.stop()
    return results


def profile(args):
    tmp = tempfile.mkdtemp(prefix="sidemesh-profile-")
    backend, args.backend_port = run.nginx_backend(tmp)
    after_rel = run.REL
    try:
        builds = []
        if args.before:
            builds.append(("before", profile_build("before", os.path.abspath(args.before), tmp, args)))
        builds.append(("after", profile_build("after", after_rel, tmp, args)))
        floods = []
        for label, rel in ([("before", os.path.abspath(args.before))] if args.before else []) + [("after", after_rel)]:
            run.REL = rel
            floods.append((label, run.idle_connections(tmp, args.backend_port, 5000)))
        run.REL = after_rel
        peers = peer_syscalls(tmp, args)
    finally:
        run.REL = after_rel
        backend.stop()
    write(args, builds, peers, floods)


NAMES = {"sidemesh-2": "Sidemesh pair, plaintext", "sidemesh-2-mtls": "Sidemesh pair, mTLS",
         "nginx-2-mtls": "nginx pair, mTLS", "haproxy-2-mtls": "HAProxy pair, mTLS"}


def write(args, builds, peers, floods=()):
    n, c = args.requests, args.connections
    lines = [
        "## Profile: instructions and syscalls per request",
        "",
        f"Produced by `bench/run.sh --only profile{' --before ' + args.before if args.before else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: `h2load --h1 -c {c}` HTTP/1.1 GETs through each pair to the nginx backend, "
        f"after a warm-up that opens every connection. Instructions are user space only, counted by callgrind "
        f"over {args.cg_requests} requests (proxies under `valgrind --tool=callgrind`, instrumentation switched on "
        f"after the warm-up); syscalls are counted by `perf trace -s` attached to every thread of each proxy over "
        f"{n} requests at full speed. A is the calling proxy, B the receiving one. These counts barely move "
        f"between runs, so they show a change that the timed figures' noise hides.",
        "",
        "| build | pair | instructions per request, A | B | syscalls per request, A | B |",
        "|---|---|---|---|---|---|",
    ]
    for label, results in builds:
        for kind in KINDS:
            r = results[kind]
            ins = [f"{x:,.0f}" for x in r["instructions"]]
            sys_ = [f"{sum(x.values()) / n:.2f}" for x in r["syscalls"]]
            lines.append(f"| {label} | {NAMES[kind]} | {ins[0]} | {ins[1]} | {sys_[0]} | {sys_[1]} |")
    for kind, total in peers.items():
        lines.append(f"| - | {NAMES[kind]} (all processes of the pair) | - | - | {sum(total.values()) / n:.2f} (both) | |")
    lines += ["", "Syscalls per request by name (both proxies of the pair, the largest):", "",
              "| build | pair | syscalls |", "|---|---|---|"]
    for label, results in builds:
        for kind in KINDS:
            total = collections.Counter()
            for x in results[kind]["syscalls"]:
                total.update(x)
            lines.append(f"| {label} | {NAMES[kind]} | {by_name(total, n)} |")
    for kind, total in peers.items():
        lines.append(f"| - | {NAMES[kind]} | {by_name(total, n)} |")
    label, results = builds[-1]
    lines += ["", f"Where the instructions go ({label}; self cost by crate, or by module of the proxy):", "",
              "| pair | proxy | " + " | ".join(f"area {i + 1}" for i in range(8)) + " |",
              "|---|---|" + "---|" * 8]
    for kind in KINDS:
        for side, dump in zip("AB", results[kind]["dumps"]):
            cells = [f"{name} {share * 100:.1f} %" for share, name in areas(dump, 8)]
            lines.append(f"| {NAMES[kind]} | {side} | " + " | ".join(cells) + " |")
    dump = results["sidemesh-2-mtls"]["dumps"][0]
    lines += ["", f"The functions with the largest self cost in proxy A of the mTLS pair ({label}):", "",
              "| share | function |", "|---|---|"]
    lines += [f"| {share * 100:.1f} % | `{name}` |" for share, name in top_functions(dump, 15)]
    if floods:
        count = floods[0][1]["count"]
        lines += ["", f"Memory of a client-side proxy (explicit upstream listener, in front of the backend) holding {count:,} idle keep-alive client "
                  "connections (one request each), and 3 s after they closed (RSS):", "",
                  "| build | idle MiB | with the connections MiB | per connection KiB | 3 s after they closed MiB | "
                  "after / idle |", "|---|---|---|---|---|---|"]
        for label, f in floods:
            lines.append(f"| {label} | {f['before'] / 1024:.1f} | {f['held'] / 1024:.1f} | "
                         f"{(f['held'] - f['before']) / f['count']:.1f} | {f['after'] / 1024:.1f} | "
                         f"{f['after'] / f['before']:.2f}x |")
    run.replace_section(args.out, "profile", "\n".join(lines))
    print("\n".join(lines))


def by_name(counter, n):
    return ", ".join(f"{name} {calls / n:.2f}" for name, calls in counter.most_common(8))
