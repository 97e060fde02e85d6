"""JSON over HTTP to OpenAI-compatible servers (vLLM, SGLang, the OpenAI API), through httpx.

One function, `post_json`, with a timeout on every request and retries with exponential
back-off for what a busy server answers transiently: no connection, no reply in time, and the
statuses the OpenAI API documents as retryable (408, 409, 429, 5xx). Other HTTP errors (a bad
request, a wrong key) fail at once. Every failure is a RuntimeError that names the URL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import httpx

RETRY_STATUSES = frozenset({408, 409, 429})  # and every status >= 500


def _retryable(status: int) -> bool:
  return status in RETRY_STATUSES or status >= 500


def post_json(url: str, body: Mapping[str, Any], *, api_key: str | None = None,
              timeout_s: float = 60.0, retries: int = 2, backoff_s: float = 1.0) -> Any:
  """POSTs `body` as JSON and returns the decoded JSON reply.

  Tries `retries + 1` times, sleeping backoff_s, 2 backoff_s, ... between tries.
  RuntimeError: no usable reply (the last error, e.g. 'HTTP 503: ...' or 'cannot connect').
  ValueError: a 2xx reply that is not JSON.
  """
  headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
  error = ""
  for attempt in range(retries + 1):
    if attempt:
      time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
      response = httpx.post(url, json=dict(body), headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
      error = f"no reply within {timeout_s:g}s"
      continue
    except httpx.TransportError as e:
      error = f"cannot connect ({type(e).__name__}: {e})"
      continue
    if response.is_success:
      try:
        return response.json()
      except ValueError:
        raise ValueError(f"{url}: reply is not JSON: {response.content[:200]!r}") from None
    error = f"HTTP {response.status_code}: {response.text[:300]}"
    if not _retryable(response.status_code):
      raise RuntimeError(f"{url}: {error}")
  tries = f" (after {retries + 1} tries)" if retries else ""
  raise RuntimeError(f"{url}: {error}{tries}")
