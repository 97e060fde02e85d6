"""A local fake OpenAI-compatible server for the tagging tests (no network needed)."""

from __future__ import annotations

import http.server
import json
import threading


class FakeServer:
  """`POST /v1/chat/completions` on 127.0.0.1: answers from a prompt->answer table."""

  def __init__(self, answers, status=200, raw_body=None):
    self.requests = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_POST(self):  # pylint: disable=invalid-name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests.append({"path": self.path, "body": body,
                               "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        reply = raw_body if raw_body is not None else json.dumps(
            {"choices": [{"message": {"role": "assistant",
                                      "content": answers.get(prompt, "?")}}]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()
