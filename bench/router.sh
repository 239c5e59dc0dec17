#!/usr/bin/env bash
# The router's data plane against HAProxy and nginx, on loopback: one nginx
# backend returning a small body; in front of it the Keel router (one worker
# thread), HAProxy (nbthread 1, keep-alive to the backend) and nginx (one
# worker, upstream keepalive). Each is driven in turn by
# `wrk -t1 -c64 -d10s --latency`, plain HTTP and then with TLS terminated,
# for ROUNDS rounds (default 3); each figure is the median over rounds.
# Proxies run pinned to CPU 0, wrk and the backend to CPU 1, the same for
# all three. The order of the three changes from round to round.
# Last line: RESULT router rps_vs_haproxy=R p99_vs_haproxy=R tls_rps_vs_haproxy=R
# Goal: rps_vs_haproxy >= 1.25 and p99_vs_haproxy <= 1, plain and with TLS.
# --quick: dev build, one 2 s round, for CI; its figures mean little.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

duration=10s
rounds="${ROUNDS:-3}"
profile=release
if [ "${1:-}" = "--quick" ]; then
  duration=2s
  rounds=1
  profile=dev
fi
for tool in wrk haproxy nginx openssl taskset; do
  command -v "$tool" >/dev/null || { echo "bench/router.sh needs $tool (scripts/setup.sh installs it)" >&2; exit 1; }
done
if [ "$profile" = release ]; then
  cargo build --quiet --locked --release -p keel-router --example router
  router_bin="$CARGO_TARGET_DIR/release/examples/router"
else
  cargo build --quiet --locked -p keel-router --example router
  router_bin="$CARGO_TARGET_DIR/debug/examples/router"
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Free loopback ports: ask the kernel, then release them.
read -r backend_port router_port router_tls haproxy_port haproxy_tls nginx_port nginx_tls < <(
  python3 -c 'import socket
socks=[socket.socket() for _ in range(7)]
[s.bind(("127.0.0.1",0)) for s in socks]
print(*[s.getsockname()[1] for s in socks])')
host=bench.keel.test

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=$host" -addext "subjectAltName=DNS:$host" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
cat "$work/cert.pem" "$work/key.pem" > "$work/combined.pem"

# The backend: nginx, a small body, keep-alive without a request limit.
mkdir -p "$work/backend" "$work/nginx"
cat > "$work/backend/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/backend/nginx.pid;
error_log $work/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$backend_port;
    location / { return 200 "hello from the backend\n"; }
  }
}
CONF
taskset -c 1 nginx -c "$work/backend/nginx.conf" -p "$work/backend" &
pids+=($!)

# The Keel router: the same certificate, stored in its table.
python3 - "$work" "$host" "$backend_port" > "$work/table.json" <<'PY'
import json, sys
work, host, port = sys.argv[1], sys.argv[2], sys.argv[3]
print(json.dumps({
  "generation": 1,
  "routes": [{"host": host, "path": "/", "tls": "terminate", "project": "bench",
              "app": "hello", "port": "http", "protocol": "http",
              "backends": [f"127.0.0.1:{port}"]}],
  "certificates": [{"host": host, "cert_pem": open(f"{work}/cert.pem").read(),
                    "key_pem": open(f"{work}/key.pem").read()}],
}))
PY
RUST_LOG=warn taskset -c 0 "$router_bin" --table "$work/table.json" --workers 1 \
  --http "127.0.0.1:$router_port" --https "127.0.0.1:$router_tls" 2> "$work/router.log" &
pids+=($!)
keel_pid=$!

cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend plain
  bind 127.0.0.1:$haproxy_port
  bind 127.0.0.1:$haproxy_tls ssl crt $work/combined.pem alpn h2,http/1.1
  default_backend hello
backend hello
  server s1 127.0.0.1:$backend_port
CONF
taskset -c 0 haproxy -f "$work/haproxy.cfg" -db 2> "$work/haproxy.log" &
pids+=($!)
haproxy_pid=$!

cat > "$work/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream hello { server 127.0.0.1:$backend_port; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$nginx_port;
    listen 127.0.0.1:$nginx_tls ssl;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    location / {
      proxy_pass http://hello;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
    }
  }
}
CONF
taskset -c 0 nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
pids+=($!)
nginx_pid=$!

# Wait until every proxy answers through to the backend.
for url in "http://127.0.0.1:$router_port/" "http://127.0.0.1:$haproxy_port/" "http://127.0.0.1:$nginx_port/"; do
  for _ in $(seq 100); do
    if curl -fsS -o /dev/null -H "Host: $host" "$url" 2>/dev/null; then break; fi
    sleep 0.1
  done
  curl -fsS -o /dev/null -H "Host: $host" "$url" || { echo "$url does not answer" >&2; cat "$work"/*.log >&2; exit 1; }
done

# CPU time (clock ticks) of a process and its children (nginx's worker).
ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# One wrk run against proxy process $1 at URL $2; prints
# "rps p99_ms errors cpu_us_per_request". The CPU figure is the proxy's own
# user and system time; it leaves out the network stack's softirq work,
# which the kernel charges to whichever task it interrupts, so take it as
# a hint. rps is the figure: the proxy's CPU is the one saturated.
run() {
  local out before after
  before=$(ticks "$1")
  out=$(taskset -c 1 wrk -t1 -c64 -d"$duration" --latency -H "Host: $host" "$2")
  after=$(ticks "$1")
  awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
    /Requests\/sec:/ { rps = $2 }
    /^ +99%/ {
      v = $2
      if (v ~ /us$/) { sub(/us$/, "", v); p99 = v / 1000 }
      else if (v ~ /ms$/) { sub(/ms$/, "", v); p99 = v }
      else if (v ~ /s$/) { sub(/s$/, "", v); p99 = v * 1000 }
    }
    /Non-2xx or 3xx responses:/ { errors += $5 }
    /Socket errors:/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
    /requests in/ { requests = $1 }
    END { printf "%s %s %d %.1f\n", rps, p99, errors, (requests > 0 ? ticks * 1e6 / hz / requests : 0) }
  ' <<< "$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A rps p99 cpu
for mode in plain tls; do
  for round in $(seq "$rounds"); do
    # Each round starts with a different proxy: which one runs first or
    # after which measurably moves the figures (a few percent), so every
    # proxy takes every place once in three rounds.
    order=(keel haproxy nginx keel haproxy)
    start=$(( (round - 1) % 3 ))
    for proxy in "${order[@]:$start:3}"; do
      case "$proxy/$mode" in
        keel/plain) url="http://127.0.0.1:$router_port/" ;;
        keel/tls) url="https://127.0.0.1:$router_tls/" ;;
        haproxy/plain) url="http://127.0.0.1:$haproxy_port/" ;;
        haproxy/tls) url="https://127.0.0.1:$haproxy_tls/" ;;
        nginx/plain) url="http://127.0.0.1:$nginx_port/" ;;
        nginx/tls) url="https://127.0.0.1:$nginx_tls/" ;;
      esac
      pid_var="${proxy}_pid"
      read -r r p e c < <(run "${!pid_var}" "$url")
      if [ "$e" != 0 ]; then
        echo "$proxy $mode: $e errors (non-2xx or socket errors)" >&2
        exit 1
      fi
      echo "round $round $mode $proxy: ${r} rps, p99 ${p} ms, ${c} us CPU per request"
      rps[$proxy/$mode]+="$r "
      p99[$proxy/$mode]+="$p "
      cpu[$proxy/$mode]+="$c "
    done
  done
done

printf '%-8s %-6s %12s %10s %14s\n' proxy mode rps p99_ms cpu_us_per_req
for mode in plain tls; do
  for proxy in keel haproxy nginx; do
    r=$(tr ' ' '\n' <<< "${rps[$proxy/$mode]}" | grep . | median)
    p=$(tr ' ' '\n' <<< "${p99[$proxy/$mode]}" | grep . | median)
    c=$(tr ' ' '\n' <<< "${cpu[$proxy/$mode]}" | grep . | median)
    printf '%-8s %-6s %12s %10s %14s\n' "$proxy" "$mode" "$r" "$p" "$c"
    declare "m_${proxy}_${mode}_rps=$r" "m_${proxy}_${mode}_p99=$p"
  done
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
echo "RESULT router rps_vs_haproxy=$(ratio "$m_keel_plain_rps" "$m_haproxy_plain_rps") p99_vs_haproxy=$(ratio "$m_keel_plain_p99" "$m_haproxy_plain_p99") tls_rps_vs_haproxy=$(ratio "$m_keel_tls_rps" "$m_haproxy_tls_rps")"
