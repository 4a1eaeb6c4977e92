#!/usr/bin/env bash
# Policy cost without nginx's drift: two gateways side by side on loopback, one with the plain
# route and one with the typical policy of issue #4 (bench/typical.rhai),
# in front of one nginx backend, loaded alternately with wrk; prints the ratio of the medians.
#   bench/policy-ab.sh            (N=6 runs of D=5 seconds each; BIN=path to another binary)
# needs: nginx and wrk. Ports: 19001 (backend), 18080/18081 and 18090/18091 (gateways).
set -euo pipefail
N=${N:-6}; D=${D:-5}
bin=${BIN:-${CARGO_TARGET_DIR:-$(dirname "$0")/../target}/release/rustygate}
d=$(mktemp -d)
trap 'kill ${p1:-} ${p2:-} 2>/dev/null || true; [[ -f $d/backend.pid ]] && kill "$(cat "$d/backend.pid")" 2>/dev/null; rm -rf "$d"' EXIT
cat >$d/backend.conf <<C
worker_processes 1; pid $d/backend.pid; error_log $d/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:19001; keepalive_requests 1000000;
    location / { return 200 "hello from backend\n"; } } }
C
nginx -c $d/backend.conf -p $d
for k in plain pol; do
  mkdir -p $d/$k/routes $d/$k/upstreams $d/$k/policies
  printf '[upstream.backend]\ntargets = ["http://127.0.0.1:19001"]\n' > $d/$k/upstreams/b.toml
  printf '[[route]]\nname = "all"\nprefix = "/"\nupstream = "backend"\n' > $d/$k/routes/all.toml
done
echo 'policy = "policies/typical.rhai"' >> $d/pol/routes/all.toml
cp "${SCRIPT:-$(dirname "$0")/typical.rhai}" $d/pol/policies/typical.rhai
$bin serve --repo $d/plain --listen 127.0.0.1:18080 --admin-listen 127.0.0.1:18081 --workers 1 --access-log false >/dev/null 2>&1 &
p1=$!
$bin serve --repo $d/pol --listen 127.0.0.1:18090 --admin-listen 127.0.0.1:18091 --workers 1 --access-log false >/dev/null 2>&1 &
p2=$!
sleep 1.5
w() { wrk -t1 -c32 -d${D}s -H "x-tenant: acme" -H "x-api-version: 2" http://127.0.0.1:$1/ | awk '/Requests\/sec/ {print $2}'; }
w 18080 >/dev/null; w 18090 >/dev/null
a=(); b=()
for i in $(seq $N); do a+=($(w 18080)); b+=($(w 18090)); done
printf 'plain: %s\npolicy: %s\n' "${a[*]}" "${b[*]}"
python3 -c "
import statistics as s
a=[float(x) for x in '${a[*]}'.split()]; b=[float(x) for x in '${b[*]}'.split()]
print('median plain %.0f policy %.0f ratio %.3f; pairwise ratios %s' % (s.median(a), s.median(b), s.median(b)/s.median(a), ' '.join('%.3f'%(y/x) for x,y in zip(a,b))))"
