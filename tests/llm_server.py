"""An OpenAI-compatible chat server on 127.0.0.1 for tests: what it replies depends on markers in the query, so
concurrent requests behave deterministically. It records every request it receives."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# keyword in the query -> the instruction the "LLM" writes for it
INSTRUCTIONS = {
    "film": "Decide whether the movie review is positive or negative and answer positive or negative.",
    "French": "Translate the English sentence into French.",
    "plus": "Solve the arithmetic problem and answer with a number.",
}


class ChatServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                payload = json.loads(body)
                query = payload["messages"][-1]["content"]
                with server.lock:
                    server.requests.append(
                        {
                            "path": self.path,
                            "payload": payload,
                            "size": len(body),
                            "auth": self.headers["Authorization"],
                        }
                    )
                    server.attempts[query] = attempt = server.attempts.get(query, 0) + 1
                try:
                    server.respond(self, query, attempt)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout under test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def send(handler, status: int, body: bytes, content_type="application/json"):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def reply(self, handler, content):
        completion = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "tiny-llm",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        }
        self.send(handler, 200, json.dumps(completion).encode())

    def respond(self, handler, query: str, attempt: int):
        if "ALWAYS500" in query or ("FLAKY" in query and attempt == 1):
            return self.send(handler, 500, b'{"error": "overloaded"}')
        if "BAD400" in query:
            return self.send(handler, 400, b'{"error": "bad request"}')
        if "SLOW" in query:
            time.sleep(3)
        if "TRICKLE" in query:  # headers, then one byte every 0.2 s for a long time: no single read times out
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", "100000")
            handler.end_headers()
            for _ in range(100):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.2)
            return None
        if "NOTJSON" in query:
            return self.send(handler, 200, b"<html>surprise</html>", "text/html")
        if "NOCHOICES" in query:
            return self.send(handler, 200, json.dumps({"id": "x", "choices": []}).encode())
        if "EMPTY" in query:
            return self.reply(handler, "")
        if "SYMBOLS" in query:
            return self.reply(handler, "!!! ??? 123")
        instruction = next((text for key, text in INSTRUCTIONS.items() if key in query), "Answer the question.")
        return self.reply(handler, f"Instruction: {instruction}\n\nThis instruction covers the examples.")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
