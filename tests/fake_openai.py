"""A fake OpenAI-compatible chat server on loopback, for the judge's tests and the real-path run."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """Answers POST /v1/chat/completions from a script of behaviours, one per request, then the
    default; records each request's headers and body and the highest number in flight at once."""

    def __init__(self):
        self.script: list[tuple] = []
        self.default: tuple = ("reply", '{"Evaluation": "ok", "Rating": 3}')
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    behaviour = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = self._reply(behaviour, body)
                finally:
                    # before the reply goes out: once the client has it, it may send its next request, which
                    # must not find this one still counted (max_in_flight read one above the client's concurrency)
                    with server.lock:
                        server.in_flight -= 1
                self._send(*reply)

            def _reply(self, behaviour, body):
                """(status, payload, headers) for ``behaviour``, after its delay."""
                kind = behaviour[0]
                if kind == "hang":
                    time.sleep(behaviour[1])
                    return 200, _completion('{"Rating": 4}', body), None
                if kind == "slow":
                    time.sleep(behaviour[1])
                    return 200, _completion(behaviour[2], body), None
                if kind == "status":
                    return behaviour[1], {"error": {"message": "try later"}}, {"retry-after-ms": "5"}
                if kind == "garbage":
                    return 200, b"<html>502 Bad Gateway</html>", None
                if kind == "rule":  # a reply computed from the request
                    return 200, _completion(behaviour[1](body), body), None
                return 200, _completion(behaviour[1], body), None

            def _send(self, status, payload, headers=None):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(content: str, body: dict) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _completion(content: str, body: dict) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
