#!/usr/bin/env python3
"""A tiny OpenAI-like upstream for scripts/check-observability.sh.

Listens on 127.0.0.1 (port 0: the kernel picks one) and prints the port on
its first line of stdout. Any request whose path contains "/fail" gets a 500;
a POST to a path ending in /v1/traces (sluice's OTLP/HTTP exporter, when
[telemetry.otlp] endpoint points here) gets an empty protobuf answer, the
collector's "all accepted"; a JSON body with "stream": true gets a short SSE
chat stream with usage; anything else a chat completion with usage. Exits by
itself after --lifetime seconds (default 300), so it never outlives a script
that died.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _raw_body(self):
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            raw = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, up to the empty line
                    while self.rfile.readline().strip():
                        pass
                    return raw
                raw += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _body(self):
        raw = self._raw_body()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}

    def _send(self, status, ctype, payload):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _answer(self):
        if self.path.split("?")[0].endswith("/v1/traces") and self.command == "POST":
            self._raw_body()
            # An empty ExportTraceServiceResponse: every span accepted.
            self._send(200, "application/x-protobuf", b"")
            return
        body = self._body()
        model = body.get("model", "mock") if isinstance(body, dict) else "mock"
        if "/fail" in self.path:
            err = {"error": {"message": "mock failure", "type": "server_error"}}
            self._send(500, "application/json", json.dumps(err).encode())
            return
        if isinstance(body, dict) and body.get("stream"):
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
            last = {"id": "c1", "object": "chat.completion.chunk", "model": model,
                    "choices": [], "usage": USAGE}
            events = [json.dumps(chunk), json.dumps(last), "[DONE]"]
            payload = "".join(f"data: {e}\n\n" for e in events).encode()
            self._send(200, "text/event-stream", payload)
            return
        answer = {"id": "c1", "object": "chat.completion", "model": model,
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": "hi"}}],
                  "usage": USAGE}
        self._send(200, "application/json", json.dumps(answer).encode())

    do_GET = do_POST = do_PUT = _answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lifetime", type=float, default=300.0)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    timer = threading.Timer(args.lifetime, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever()


if __name__ == "__main__":
    main()
