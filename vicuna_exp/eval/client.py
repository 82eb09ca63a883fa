"""A minimal client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, TGI, ...).

The key comes only from the environment variable the config names, and is never written
anywhere. A local endpoint (localhost, 127.x) may run without a key: then no Authorization
header is sent. Transient failures (429, 5xx, timeouts, dropped connections) are retried
with exponential backoff; a rejected request (other 4xx) is not, and an endpoint that
refuses us outright (401, 403, 404) stops the whole judging run.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from vicuna_exp.errors import UsageError

log = logging.getLogger(__name__)

_FATAL_STATUS = (401, 403, 404)


class JudgeRequestError(Exception):
    """One request failed for good (after its retries); the item is left ungraded."""


class EndpointRejected(JudgeRequestError):
    """The endpoint refuses every request (bad key, unknown model or URL): stop judging."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None  # None: no Authorization header (local endpoints only)

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"


def is_local(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_endpoint(judge: Any, environ: dict[str, str] | None = None) -> Endpoint:
    """The judge endpoint and key, or a UsageError saying what to set. Touches no network."""
    env = os.environ if environ is None else environ
    if not judge.base_url:
        raise UsageError(
            "eval.judge.base_url: no judge endpoint configured; set eval.judge.base_url "
            "(an OpenAI-compatible API, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1) "
            "and eval.judge.model"
        )
    if not judge.model:
        raise UsageError("eval.judge.model: no judge model configured (e.g. eval.judge.model=gpt-4)")
    url = urlparse(str(judge.base_url))
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError(f"eval.judge.base_url={judge.base_url}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    key = (env.get(judge.api_key_env) or "").strip() or None
    if key is None and not is_local(url.hostname):
        raise UsageError(
            f"eval.judge.api_key_env: ${judge.api_key_env} is not set, and {judge.base_url} is not a local "
            f"endpoint; export {judge.api_key_env}=... (the key is read only from the environment)"
        )
    return Endpoint(str(judge.base_url).rstrip("/"), str(judge.model), key)


class ChatClient:
    """Thread-safe: one HTTP connection pool shared by the judging threads."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        temperature: float,
        max_tokens: int,
        concurrency: int,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx

        logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
        self.endpoint = endpoint
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._sleep = sleep
        self._rejected: str | None = None
        self._lock = threading.Lock()
        self.requests_sent = 0
        headers = {"Content-Type": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=max(1, concurrency)),
            trust_env=not is_local(urlparse(endpoint.base_url).hostname or ""),  # no proxy for localhost
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = self.backoff_s * (2**attempt)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass  # an HTTP date: keep our own backoff
        return min(delay, self.max_backoff_s)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The assistant message's content; JudgeRequestError when it cannot be had."""
        import httpx

        body = {
            "model": self.endpoint.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self._rejected:
                raise EndpointRejected(self._rejected)
            retry_after = None
            with self._lock:
                self.requests_sent += 1
            try:
                resp = self._http.post(self.endpoint.url, json=body)
            except httpx.TimeoutException:
                last = "timed out"
            except httpx.TransportError as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            else:
                if resp.status_code == 200:
                    return _content(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200].strip()}"
                if resp.status_code in _FATAL_STATUS:
                    self._rejected = f"{self.endpoint.url} rejected the request ({last})"
                    raise EndpointRejected(self._rejected)
                if resp.status_code != 429 and resp.status_code < 500:
                    raise JudgeRequestError(last)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.max_retries:
                delay = self._delay(attempt, retry_after)
                log.debug("judge request %s; retry %d/%d in %.1fs", last, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise JudgeRequestError(f"{last} (after {self.max_retries + 1} attempts)")


def _content(resp: Any) -> str:
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeRequestError(f"malformed response: {resp.text[:200].strip()!r}") from None
    if not isinstance(content, str):
        raise JudgeRequestError(f"malformed response: content is {type(content).__name__}")
    return content
