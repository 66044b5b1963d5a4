"""What /metrics reports: requests by endpoint and status, latency percentiles, tokens per second,
batch sizes, and the requests in flight. In-process counters; the latency and token windows are
bounded (the last `window` requests, the last `rate_window_s` seconds), so a long-running server
does not grow."""

from __future__ import annotations

import collections
import math
import time
from typing import Any


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


class ServerMetrics:
    def __init__(self, window: int = 2048, rate_window_s: float = 60.0):
        self.started = time.time()
        self.requests: collections.Counter = collections.Counter()      # (path, status) -> count
        self.latency: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))
        self.rate_window_s = rate_window_s
        self._tokens: collections.deque = collections.deque()  # (time, completion tokens)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.in_flight = 0
        self.cancelled = 0

    def request_done(self, path: str, status: int, seconds: float, timed: bool) -> None:
        self.requests[(path, status)] += 1
        if timed and status < 400:
            self.latency[path].append(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        now = time.time()
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self._tokens.append((now, completion))
        while self._tokens and self._tokens[0][0] < now - self.rate_window_s:
            self._tokens.popleft()

    def snapshot(self, batcher=None) -> dict[str, Any]:
        now = time.time()
        uptime = now - self.started
        recent = [(t, n) for t, n in self._tokens if t >= now - self.rate_window_s]
        span = min(self.rate_window_s, uptime) or 1.0
        by_path: dict[str, dict[str, Any]] = {}
        for (path, status), n in sorted(self.requests.items()):
            entry = by_path.setdefault(path, {"total": 0, "by_status": {}})
            entry["total"] += n
            entry["by_status"][str(status)] = n
        latency = {}
        for path, values in self.latency.items():
            s = sorted(values)
            latency[path] = {"count": len(s), **{f"p{q}_ms": round(percentile(s, q) * 1000, 2) for q in (50, 90, 99)},
                             "mean_ms": round(sum(s) / len(s) * 1000, 2)}
        out: dict[str, Any] = {
            "uptime_s": round(uptime, 1),
            "requests": {"total": sum(self.requests.values()), "by_endpoint": by_path, "in_flight": self.in_flight,
                         "cancelled": self.cancelled},
            "latency": latency,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "completion_per_s": round(sum(n for _, n in recent) / span, 2),
                       "completion_per_s_window_s": round(span, 1)},
        }
        if batcher is not None:
            st = batcher.stats
            out["batches"] = {"count": st.batches, "rows": st.rows, "mean_size": round(st.rows / st.batches, 3) if st.batches else None,
                              "largest": st.largest, "sizes": {str(k): v for k, v in sorted(st.sizes.items())},
                              "queued": batcher.queued, "running": batcher.busy,
                              "max_batch_size": batcher.max_batch_size, "workers": batcher.workers}
        return out
