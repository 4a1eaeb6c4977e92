# Sourced by the benchmark scripts: the nginx backend they all measure against, and nginx as the
# proxy they compare the gateway with.
#
# backend_conf DIR PORT: writes DIR/backend.conf, an nginx that answers every path on
# 127.0.0.1:PORT with 200 "hello from backend\n" (19 bytes), keep-alive, no access log, one
# worker, daemonised with its pid in DIR/backend.pid. Start it with `nginx -c DIR/backend.conf`
# and stop it by that pid. The same backend as bench/compare.sh's.
backend_conf() {
  cat >"$1/backend.conf" <<CONF
worker_processes 1; pid $1/backend.pid; error_log $1/backend.err; daemon on;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:$2; keepalive_requests 1000000;
    location / { return 200 "hello from backend\n"; } } }
CONF
}

# proxy_conf DIR PORT BACKEND_PORT [DIRECTIVES]: writes DIR/proxy.conf, nginx as a reverse proxy
# on 127.0.0.1:PORT to the backend on BACKEND_PORT as bench/compare.sh configures it
# (one worker, upstream keep-alive, no access log), with DIRECTIVES added to its location. Its
# pid goes to DIR/proxy.pid; no `daemon` directive, so each script chooses with `-g`.
proxy_conf() {
  cat >"$1/proxy.conf" <<CONF
worker_processes 1; pid $1/proxy.pid; error_log $1/proxy.err;
events { worker_connections 4096; }
http { access_log off;
  upstream be { server 127.0.0.1:$3; keepalive 128; }
  server { listen 127.0.0.1:$2; keepalive_requests 1000000;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; ${4:-} } } }
CONF
}
