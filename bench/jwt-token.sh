#!/usr/bin/env bash
# Prints an HS256 JWT for the FILTERS=1 benchmark: signed with $JWT_BENCH_SECRET, valid one hour.
set -euo pipefail
: "${JWT_BENCH_SECRET:?set JWT_BENCH_SECRET}"
python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
claims = b64(json.dumps({"sub": "bench", "iss": "https://bench.example", "aud": "bench", "exp": int(time.time()) + 3600}).encode())
msg = f"{header}.{claims}".encode()
sig = b64(hmac.new(os.environ["JWT_BENCH_SECRET"].encode(), msg, hashlib.sha256).digest())
print(f"{header}.{claims}.{sig}")
PY
