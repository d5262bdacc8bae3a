"""Statistics the tools share: latency histograms, exact percentiles,
medians and trends.

Latency histograms: log buckets, mergeable across worker processes.

A delivery's latency in microseconds goes into bucket `1 + int(ln(us) * 50)`
(bucket 0 holds anything under 1 us), so a bucket spans about 2%, and a
reported percentile is within 1% of the true value. A run's memory is bounded
by buckets x seconds, not by the number of deliveries, and histograms from
several processes merge by adding counts.
"""

from __future__ import annotations

import math
import statistics
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


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of sorted values (q=1: the max); None if empty."""
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def exact_percentiles_ms(values_ms: list[float], quantiles: Iterable[float]) -> dict[str, float | None]:
    names = {q: "max" if q >= 1 else f"p{q * 100:g}".replace(".", "") for q in quantiles}
    ordered = sorted(values_ms)
    out: dict[str, float | None] = {}
    for q, name in names.items():
        value = percentile(ordered, q)
        out[name] = None if value is None else round(value, 3)
    return out


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None: not measured)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return None
    sxy = sum((t - mx) * (v - my) for t, v in points)
    return sxy / sxx * 60.0
