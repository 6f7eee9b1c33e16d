"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for the judge tests."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(content: str) -> bytes:
  return json.dumps(
      {
          "id": "x",
          "object": "chat.completion",
          "choices": [
              {
                  "index": 0,
                  "message": {"role": "assistant", "content": content},
                  "finish_reason": "stop",
              }
          ],
      }
  ).encode()


class JudgeServer:
  """Answers each POST with the next scripted reply: (status, body bytes, delay seconds); once
  the script is used up, ``default(request)`` answers. Records every request's headers and body."""

  def __init__(self, script=(), default=None):
    self.script = list(script)
    self.default = default or (lambda request: (200, completion("Fine. Rating: [[5]]"), 0.0))
    self.requests = []
    self.lock = threading.Lock()
    server = self

    class Handler(BaseHTTPRequestHandler):

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
          server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
          status, reply, delay = server.script.pop(0) if server.script else server.default(body)
        time.sleep(delay)
        try:
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(reply)))
          self.end_headers()
          self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up waiting

      def log_message(self, *args):
        pass

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()
