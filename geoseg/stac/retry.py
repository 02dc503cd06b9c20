"""The retry policy of asset reads (see geoseg.stac.remote), in a module light enough for the
CLI to read its defaults at start-up."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one asset read tries before its tile fails. Picklable: it rides in dask tasks.

    tries: attempts per HTTP request (COPC) or per window read (COG), the first one included.
    budget_s: most seconds one asset read may spend waiting between attempts, in total.
    base_delay_s / max_delay_s: attempt k waits uniform(0, min(max, base * 2**k)) ("full
        jitter", so many workers hitting one store spread out), or the server's Retry-After
        if that is longer (capped at `retry_after_max_s`).
    timeout_s: a request with no progress for this long is abandoned (and retried).
    """

    tries: int = 8
    budget_s: float = 300.0
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    retry_after_max_s: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        wait = random.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**attempt))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.retry_after_max_s))
        return wait


DEFAULT_POLICY = RetryPolicy()
