#!/usr/bin/env bash
# Sidemesh benchmarks: installs the peers (nginx, HAProxy, wrk, h2load from Debian; rotel from
# PyPI as the OTLP collector), builds release binaries, then runs bench/run.py, which writes
# BENCHMARKS.md.
#
#   bench/run.sh                 # the report's main section: direct vs Sidemesh (plaintext, mTLS,
#                                # mTLS with policies and tracing) vs nginx and HAProxy mTLS pairs,
#                                # HTTP/1.1 and gRPC; 3 interleaved rounds, about 15 minutes on 2 cores
#   bench/run.sh --rounds 5      # more rounds, tighter spread
#   bench/run.sh --only mtls     # one other section (data-plane, control-plane, policies, mtls, tracing,
#                                # multiplex: the mTLS pair with and without HTTP/1.x multiplexing)
#   bench/run.sh --all           # every section
#   bench/run.sh --only faults   # the fault table (RELIABILITY.md): load through the demo mesh while
#                                # each fault happens in turn; pods and tc netem as root, ~6 minutes
#   bench/run.sh --only balancing  # least-request vs peak EWMA vs round robin, uneven endpoints
#   bench/run.sh --only profile [--before DIR]
#                                # instructions (callgrind) and syscalls (perf trace) per request of
#                                # the Sidemesh pairs; DIR: an earlier build's target/release, beside
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--only" ] && [ "${2:-}" = "faults" ]; then
  command -v tc >/dev/null || { sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo;
    $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq iproute2; }
  shift 2
  exec cargo bench --locked -p sidemesh-tests --bench faults -- "$@"
fi
if [ "${1:-}" = "--only" ] && [ "${2:-}" = "balancing" ]; then
  exec cargo bench --locked -p sidemesh-tests --bench balancing
fi

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v taskset >/dev/null || missing+=(util-linux)
command -v openssl >/dev/null || missing+=(openssl)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v perf >/dev/null || missing+=(linux-perf)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
if ! python3 -c "import rotel" 2>/dev/null; then
  python3 -m pip install --quiet rotel==0.0.1a15 \
    || python3 -m pip install --quiet --break-system-packages rotel==0.0.1a15
fi

cargo build --release --locked -p sidemesh-proxy -p sidemesh-demo -p sidemesh-control-plane -p sidemesh-tests --bins
exec python3 bench/run.py "$@"
