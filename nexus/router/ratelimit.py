"""Token buckets per event source, applied by the router before journaling."""

from __future__ import annotations

from nexus.config import RateLimits


class TokenBucket:
    """A token bucket that also queues the rejected: each event turned away is
    given the time of the next token nobody was promised yet, so producers that
    retry at their retry-after arrive at the source's rate instead of all at once
    (which would turn most retries into new rejections)."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "promised")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), now
        self.promised = now  # tokens until this time are promised to rejected events

    def take(self, now: float) -> float:
        """0.0 if a token was taken, else seconds until this event's turn."""
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0 - 1e-9:  # float drift must not cost a whole token
            self.tokens = max(0.0, tokens - 1.0)
            return 0.0
        self.tokens = tokens
        turn = max(now + (1.0 - tokens) / self.rate, self.promised + 1.0 / self.rate)
        self.promised = turn
        return turn - now


class RateLimiter:
    MAX_SOURCES = 10_000  # sources are producer-chosen strings: bound the table

    def __init__(self, limits: RateLimits):
        self.limits = limits
        self.buckets: dict[str, TokenBucket] = {}
        self.enabled = bool(limits.default or limits.sources)

    def check(self, source: str, now: float) -> float:
        """0.0 when the event may pass, else the retry-after in seconds."""
        bucket = self.buckets.get(source)
        if bucket is None:
            spec = self.limits.sources.get(source, self.limits.default)
            if spec is None:
                return 0.0
            if len(self.buckets) >= self.MAX_SOURCES:
                self.buckets.pop(next(iter(self.buckets)))
            bucket = self.buckets[source] = TokenBucket(spec.rate, spec.burst, now)
        return bucket.take(now)

    def describe(self) -> dict:
        out = {}
        if self.limits.default:
            out["default"] = {"rate": self.limits.default.rate, "burst": self.limits.default.burst}
        for name, spec in self.limits.sources.items():
            out[name] = {"rate": spec.rate, "burst": spec.burst}
        return out
