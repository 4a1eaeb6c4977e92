# Sourced by the benchmark scripts: the nginx backend they all measure against.
#
# backend_conf DIR PORT: writes DIR/backend.conf, an nginx that answers every path on
# 127.0.0.1:PORT with 200 "hello from backend\n" (19 bytes), keep-alive, no access log, one
# worker, daemonised with its pid in DIR/backend.pid. Start it with `nginx -c DIR/backend.conf`
# and stop it by that pid. The same backend as ../shared/bench/compare.sh's.
backend_conf() {
  cat >"$1/backend.conf" <<CONF
worker_processes 1; pid $1/backend.pid; error_log $1/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$2; keepalive_requests 1000000;
    location / { return 200 "hello from backend\n"; } } }
CONF
}
