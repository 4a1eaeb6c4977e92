#!/usr/bin/env bash
# TLS and HTTP/2 side by side with nginx on loopback (a benchmark, not a test): the same nginx
# backend behind nginx and behind RustyGate, one worker each, keep-alive, rounds alternating so
# machine drift hits both alike. Quote the median ratio gateway/nginx, not absolute numbers.
#
#   tls-h1 : wrk over TLS (HTTP/1.1; wrk offers no ALPN)      nginx `listen ssl http2` vs [[listener]] tls
#   h2-tls : h2load over TLS, ALPN h2, -c 32 -m 10             same listeners
#   h2c    : h2load with prior knowledge, -c 32 -m 10          nginx `listen http2` vs --listen
#
# usage: benches/edge_compare.sh [--rounds N] [--duration S] [--binary target/release/rustygate]
# needs: nginx (1.22: `listen … http2`), wrk, h2load (nghttp2-client), openssl
set -euo pipefail

rounds=3 duration=5 binary=target/release/rustygate
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) echo "edge_compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
for c in nginx wrk h2load openssl; do
  command -v $c >/dev/null || { echo "edge_compare.sh: needs $c" >&2; exit 2; }
done
binary=$(realpath "$binary")

backend=19101 ng_tls=19102 ng_h2c=19103 gw_plain=19104 gw_tls=19105 gw_admin=19106
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in backend proxy; do
    [[ -f $dir/$f.pid ]] && kill "$(cat "$dir/$f.pid")" 2>/dev/null || true
  done
  sleep 0.3; rm -rf "$dir"
}
trap cleanup EXIT

# One self-signed certificate for both, as in examples/tls.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null

# shellcheck source=bench/backend.sh
. "$(dirname "$0")/../bench/backend.sh"
backend_conf "$dir" "$backend"
cat >"$dir/proxy.conf" <<EOF
worker_processes 1; pid $dir/proxy.pid; error_log $dir/proxy.err; daemon on;
events { worker_connections 4096; }
http { access_log off;
  upstream be { server 127.0.0.1:$backend; keepalive 128; }
  server { listen 127.0.0.1:$ng_tls ssl http2; listen 127.0.0.1:$ng_h2c http2;
    ssl_certificate $dir/cert.pem; ssl_certificate_key $dir/key.pem;
    keepalive_requests 1000000;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
mkdir -p "$dir/repo/routes" "$dir/repo/upstreams"
cat >"$dir/repo/routes/all.toml" <<EOF
[[route]]
name = "all"
prefix = "/"
upstream = "be"
EOF
cat >"$dir/repo/upstreams/be.toml" <<EOF
[upstream.be]
targets = ["http://127.0.0.1:$backend"]
EOF
cat >"$dir/repo/gateway.toml" <<EOF
[[listener]]
name = "https"
address = "127.0.0.1:$gw_tls"
tls = { certificates = [ { cert = { file = "$dir/cert.pem" }, key = { file = "$dir/key.pem" } } ] }
EOF

nginx -c "$dir/backend.conf"
nginx -c "$dir/proxy.conf"
"$binary" serve --repo "$dir/repo" --secret-root "$dir" --listen 127.0.0.1:$gw_plain \
  --admin-listen 127.0.0.1:$gw_admin --workers 1 --access-log false >"$dir/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  curl -fsk -o /dev/null "https://127.0.0.1:$gw_tls/" && break
  sleep 0.1
done
curl -fsk -o /dev/null "https://127.0.0.1:$gw_tls/" || { echo "gateway did not start:" >&2; tail -20 "$dir/gateway.log" >&2; exit 1; }

wrk_rps() { wrk -t1 -c32 -d"${duration}s" "$1" 2>/dev/null | awk '/Requests\/sec/ {print $2}'; }
h2_rps() { # -D: duration; warm-up 1 s
  h2load -c32 -m10 -D "$duration" --warm-up-time=1 "$1" 2>/dev/null \
    | awk '/^finished in/ {gsub(",","",$4); print $4} /^status codes/ {if ($3+0 == 0) print "bad" > "/dev/stderr"}'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A ratios
printf '%-7s %-7s %14s %14s %8s\n' round run nginx gateway ratio
for r in $(seq 1 "$rounds"); do
  for run in tls-h1 h2-tls h2c; do
    case $run in
      tls-h1) n=$(wrk_rps "https://127.0.0.1:$ng_tls/"); g=$(wrk_rps "https://127.0.0.1:$gw_tls/") ;;
      h2-tls) n=$(h2_rps "https://127.0.0.1:$ng_tls/"); g=$(h2_rps "https://127.0.0.1:$gw_tls/") ;;
      h2c) n=$(h2_rps "http://127.0.0.1:$ng_h2c/"); g=$(h2_rps "http://127.0.0.1:$gw_plain/") ;;
    esac
    ratio=$(awk -v a="${g:-0}" -v b="${n:-0}" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')
    ratios[$run]+="$ratio "
    printf '%-7s %-7s %14s %14s %8s\n' "$r" "$run" "$n" "$g" "$ratio"
  done
done
for run in tls-h1 h2-tls h2c; do
  # shellcheck disable=SC2086
  echo "median ratio gateway/nginx $run: $(median ${ratios[$run]})"
done
