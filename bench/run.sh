#!/usr/bin/env bash
# Sidemesh data-plane benchmark: installs the peers (nginx, HAProxy, wrk, h2load from Debian),
# builds release binaries, then runs bench/run.py, which writes BENCHMARKS.md.
#
#   bench/run.sh                 # 3 interleaved rounds (about 10 minutes on 2 cores)
#   bench/run.sh --rounds 5      # more rounds, tighter spread
#   bench/run.sh --only control-plane   # one section only (data-plane, control-plane, policies, mtls, tracing)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v taskset >/dev/null || missing+=(util-linux)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

cargo build --release --locked -p sidemesh-proxy -p sidemesh-demo -p sidemesh-control-plane -p sidemesh-tests --bins
exec python3 bench/run.py "$@"
