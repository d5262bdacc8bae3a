"""Latency histograms: log buckets, mergeable across worker processes.

A delivery's latency in microseconds goes into bucket `1 + int(ln(us) * 50)`
(bucket 0 holds anything under 1 us), so a bucket spans about 2%, and a
reported percentile is within 1% of the true value. A run's memory is bounded
by buckets x seconds, not by the number of deliveries, and histograms from
several processes merge by adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

BUCKETS_PER_E = 50


def bucket_of(latency_us: int) -> int:
    if latency_us < 1:
        return 0
    return 1 + int(math.log(latency_us) * BUCKETS_PER_E)


def bucket_value_us(bucket: int) -> float:
    """The geometric middle of a bucket, in microseconds."""
    if bucket <= 0:
        return 0.5
    return math.exp((bucket - 0.5) / BUCKETS_PER_E)


def merge(into: dict[int, int], other: Mapping[int, int]) -> None:
    for bucket, count in other.items():
        into[bucket] = into.get(bucket, 0) + count


def merged(hists: Iterable[Mapping[int, int]]) -> dict[int, int]:
    total: dict[int, int] = {}
    for hist in hists:
        merge(total, hist)
    return total


def percentiles_ms(
    hist: Mapping[int, int], quantiles: Iterable[float], max_us: float | None = None
) -> dict[str, float | None]:
    """{"p50": ms, ...}; a percentile is never reported above the true max."""
    count = sum(hist.values())
    names = {q: f"p{q * 100:g}".replace(".", "") for q in quantiles}
    if count == 0:
        return {name: None for name in names.values()}
    out: dict[str, float | None] = {}
    ordered = sorted(hist.items())
    for q, name in names.items():
        rank = max(1, math.ceil(q * count))
        seen = 0
        for bucket, n in ordered:
            seen += n
            if seen >= rank:
                value = bucket_value_us(bucket)
                if max_us is not None:
                    value = min(value, max_us)
                out[name] = round(value / 1000.0, 3)
                break
    return out


def exact_percentiles_ms(values_ms: list[float], quantiles: Iterable[float]) -> dict[str, float | None]:
    names = {q: "max" if q >= 1 else f"p{q * 100:g}".replace(".", "") for q in quantiles}
    if not values_ms:
        return {name: None for name in names.values()}
    ordered = sorted(values_ms)
    return {
        name: round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)
        for q, name in names.items()
    }
