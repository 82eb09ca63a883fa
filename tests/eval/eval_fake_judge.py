"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the judge tests.

Each test gives a `script(body, n) -> Reply` (n = 0-based request number); the server records
every request's headers and body and the peak number of requests in flight at once.
No network beyond the loopback interface, no keys.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    content: str | None = "Fine. Rating: [[5]]"
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    raw: str | None = None  # a body sent verbatim instead of a completion


Script = Callable[[dict[str, Any], int], Reply]


class FakeJudge:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with judge._lock:
                    n = len(judge.requests)
                    judge.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    if self.path != "/v1/chat/completions":
                        reply = Reply(status=404, raw='{"error": "no such route"}')
                    else:
                        reply = judge.script(body, n)
                    time.sleep(reply.delay)
                    payload = reply.raw if reply.raw is not None else json.dumps({
                        "id": f"cmpl-{n}", "object": "chat.completion", "model": body.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content},
                                     "finish_reason": "stop"}],
                    })
                    data = payload.encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def user_prompts(self) -> list[str]:
        return [body["messages"][-1]["content"] for _, body in self.requests]


def marker(text: str, name: str) -> int | None:
    """The last `NAME=k` in the text: in a two-turn prompt, the second answer's."""
    found = re.findall(rf"{name}=(\d+)", text)
    return int(found[-1]) if found else None


def rate_by_marker(body: dict[str, Any], n: int) -> Reply:
    """Single grading: the answer being graded says `SCORE=k`; the judge gives k.

    For a second turn the graded answer is the last one shown, so the last marker counts."""
    score = marker(body["messages"][-1]["content"], "SCORE")
    return Reply(f"The answer is adequate. Rating: [[{score}]]" if score else "No marker. Rating: [[1]]")


def prefer_stronger(body: dict[str, Any], n: int) -> Reply:
    """Pairwise: the answer with the larger `STRENGTH=k` wins; equal strength is a tie."""
    prompt = body["messages"][-1]["content"]
    a = prompt.split("Assistant A", 1)[1].split("Assistant B", 1)[0]
    b = prompt.split("Assistant B", 1)[1]
    sa, sb = marker(a, "STRENGTH") or 0, marker(b, "STRENGTH") or 0
    verdict = "[[A]]" if sa > sb else "[[B]]" if sb > sa else "[[C]]"
    return Reply(f"Comparing both. Final verdict: {verdict}")
