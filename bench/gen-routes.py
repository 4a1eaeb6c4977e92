#!/usr/bin/env python3
"""Writes a config repo with N routes for bench/config-scale.sh (issue #14, "config at scale").

    bench/gen-routes.py N DIR [--variant K]

The mix, per 10 routes: 4 exact paths, 3 `{param}` paths (some with `rewrite`), 3 prefixes (some
with `strip_prefix`); 8 on exact hosts (N/500 of them, at least 10), 1 on a wildcard host, 1 on
any host. About 30% list `methods`, 10% use JWT auth, 10% a CORS preset, 5% an inline rate limit,
5% set request headers, 10% a timeout, 1% a policy, 1% answer directly (`respond`). 20 upstreams
of 2 targets on loopback (never contacted: no health checks). Routes are written 500 per file.

Besides, `routes/zz-bench.toml` holds `GET /bench` (any host), answered by the gateway with the
body "variant K" (`--variant K`, default 0): rewriting that one file gives a new config version,
which is what the swap benchmark does before each reload. The secret for `[auth.idp]` is
read from BENCH_JWT_SECRET.
"""

import os
import sys

PER_FILE = 500
UPSTREAMS = 20
RESOURCES = ["orders", "users", "items", "carts", "invoices", "payments", "search", "reports"]


def route(i: int, hosts: int) -> str:
    out = [f'[[route]]\nname = "r{i}"\n']
    kind = i % 10
    if kind == 0:
        pass  # any host
    elif kind == 1:
        out.append(f'host = "*.t{i % max(1, hosts // 10)}.example.net"\n')
    else:
        out.append(f'host = "svc{i % hosts}.example.com"\n')
    res = RESOURCES[i % len(RESOURCES)]
    version = i % 3 + 1
    shape = (i // 10 + i) % 10
    if shape < 4:
        out.append(f'path = "/api/v{version}/{res}{i}"\n')
    elif shape < 7:
        if i % 3 == 0:
            out.append(f'path = "/api/v{version}/{res}{i}/{{id}}/lines/{{line}}"\n')
        else:
            out.append(f'path = "/api/v{version}/{res}{i}/{{id}}"\n')
            if i % 5 == 0:
                out.append(f'rewrite = "/v{version}/{res}/{{id}}"\n')
    else:
        out.append(f'prefix = "/static/{res}{i}"\n')
        if i % 2 == 0:
            out.append(f'strip_prefix = "/static/{res}{i}"\n')
    m = i % 10
    if m in (2, 5):
        out.append('methods = ["GET", "HEAD"]\n')
    elif m == 7:
        out.append('methods = ["POST", "PUT", "PATCH"]\n')
    if i % 100 == 42:
        out.append('respond = { status = 200, body = "ok" }\n')
        return "".join(out)
    out.append(f'upstream = "be{i % UPSTREAMS}"\n')
    if i % 10 == 3:
        out.append('auth = "idp"\n')
    if i % 10 == 4:
        out.append('cors = "public"\n')
    if i % 20 == 6:
        out.append('rate_limit = { requests = 100, per = "1m", key = "client_ip" }\n')
    if i % 20 == 8:
        out.append(f'request_headers = {{ set = {{ "x-route" = "r{i}" }}, remove = ["cookie"] }}\n')
    if i % 10 == 9:
        out.append('timeout = "5s"\n')
    if i % 100 == 17:
        out.append('policy = "policies/typical.rhai"\n')
    return "".join(out)


def main() -> None:
    args = sys.argv[1:]
    variant = 0
    if "--variant" in args:
        k = args.index("--variant")
        variant = int(args[k + 1])
        del args[k : k + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    n, root = int(args[0]), args[1]
    hosts = max(10, n // 500)
    for d in ("routes", "upstreams", "policies"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, "gateway.toml"), "w") as f:
        f.write(
            '[defaults]\ntimeout = "30s"\n\n'
            '[auth.idp]\ntype = "jwt"\nalgorithms = ["HS256"]\n'
            'secret = { env = "BENCH_JWT_SECRET" }\n'
            'issuers = ["https://idp.example.com"]\naudiences = ["api"]\n\n'
            '[cors.public]\nallow_origins = ["https://app.example.com", "https://*.example.com"]\n'
            'allow_methods = ["GET", "POST"]\n'
        )
    with open(os.path.join(root, "upstreams", "all.toml"), "w") as f:
        for u in range(UPSTREAMS):
            f.write(
                f'[upstream.be{u}]\n'
                f'targets = ["http://127.0.0.1:{20000 + 2 * u}", '
                f'{{ url = "http://127.0.0.1:{20001 + 2 * u}", weight = 2 }}]\n\n'
            )
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "typical.rhai")) as src, open(
        os.path.join(root, "policies", "typical.rhai"), "w"
    ) as dst:
        dst.write(src.read())
    for start in range(0, n, PER_FILE):
        name = os.path.join(root, "routes", f"part{start // PER_FILE:04}.toml")
        with open(name, "w") as f:
            for i in range(start, min(n, start + PER_FILE)):
                f.write(route(i, hosts))
                f.write("\n")
    write_bench_route(root, variant)


def write_bench_route(root: str, variant: int) -> None:
    """`GET /bench` (any host), answered by the gateway: what the swap benchmark requests."""
    with open(os.path.join(root, "routes", "zz-bench.toml"), "w") as f:
        f.write(
            f'[[route]]\nname = "bench"\npath = "/bench"\n'
            f'respond = {{ status = 200, body = "variant {variant}" }}\n'
        )


if __name__ == "__main__":
    main()
