"""Rate-limit memory: RSS of one route's token buckets fed a million distinct client keys.

    .venv/bin/python bench/rate_limit.py          # interpreted
    .venv-native/bin/python bench/rate_limit.py   # compiled

With the default ``max_keys`` (100,000) the table stops growing at that many buckets, whatever the
number of keys; with ``max_keys: 1000000`` it holds them all. Also prints the cost of one take().
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

from balancer.dataplane.guards import RateLimiter


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    keys = [b"10.%d.%d.%d" % (n >> 16 & 255, n >> 8 & 255, n & 255) for n in range(1_000_000)]
    for max_keys in (100_000, 1_000_000):
        gc.collect()
        before = rss_mib()
        limiter = RateLimiter(rate=100.0, burst=50, key="client_ip", max_keys=max_keys)
        started = time.perf_counter()
        for key in keys:
            limiter.take(key)
        elapsed = time.perf_counter() - started
        print(f"max_keys {max_keys:>9,}: {len(limiter):>9,} buckets after 1,000,000 keys, "
              f"RSS +{rss_mib() - before:6.1f} MiB, {elapsed / len(keys) * 1e6:.2f} µs a take")
        del limiter


if __name__ == "__main__":
    main()
