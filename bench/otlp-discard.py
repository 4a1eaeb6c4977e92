#!/usr/bin/env python3
"""An OTLP/HTTP collector for benchmarks that keeps nothing: answers 200 to every POST (after
reading the body) and counts requests and bytes, printed on exit. Loopback only.

usage: bench/otlp-discard.py [PORT]   (default 4318; the gateway's endpoint is
       http://127.0.0.1:PORT/v1/traces)
"""
import http.server
import signal
import sys

stats = {"posts": 0, "bytes": 0, "gzip": 0}


class Discard(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        stats["posts"] += 1
        stats["bytes"] += n
        if self.headers.get("content-encoding") == "gzip":
            stats["gzip"] += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 4318
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Discard)

    def stop(*_):
        print(f"otlp-discard: {stats['posts']} posts ({stats['gzip']} gzipped), {stats['bytes']} bytes", file=sys.stderr)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
