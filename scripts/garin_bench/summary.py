"""Summarize several bench.py results: a table (medians per label) and one plot.

    python scripts/bench_summary.py --plot docs/perf.png \\
        "before=results/target-v0-*.json" "1 router=results/target-r1-*.json" ...

Each argument is LABEL=GLOB; the runs that match are one group, and the
table shows the median of each number over the group (the machine is shared
and noisy: compare groups measured in the same session, never single runs).
The plot has up to three panels, drawn from the groups whose labels start
with a prefix: "cpu:" (server CPU per delivery, split into routers and shards),
"ladder:" (delivered against offered deliveries/s, one line per label,
several rates per group; a run with loss or p99 over 50 ms is drawn hollow) and "rss:" (RSS per idle
connection).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from typing import Any

from garin_bench.stats import median


def load(pattern: str) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def numbers(run: dict[str, Any]) -> dict[str, float | None]:
    srv = run.get("server") or {}
    per = srv.get("per_process", [])
    dps = run["traffic"]["deliveries_per_s"] or None
    routers = sum(p["cpu_cores"] for p in per if "router" in p["name"])
    shards = sum(p["cpu_cores"] for p in per if "shard" in p["name"])
    foreign = run["machine"]["busy_cores"] - (srv.get("cpu_cores") or 0) - run["client"]["cpu_cores_total"]
    return {
        "deliveries_per_s": dps,
        "cpu_us_per_delivery": srv.get("cpu_us_per_delivery"),
        "router_us": routers / dps * 1e6 if dps else None,
        "shard_us": shards / dps * 1e6 if dps else None,
        "p50_ms": run["latency_ms"]["p50"],
        "p99_ms": run["latency_ms"]["p99"],
        "max_ms": run["latency_ms"]["max"],
        "lost": run["traffic"]["lost"],
        "rss_kib_per_conn": srv.get("rss_per_connection_kib"),
        "joins_per_s": run["connect"]["joins_per_s"],
        "client_cores": run["client"]["cpu_cores_total"],
        "foreign_cores": round(foreign, 2),
        "floor_us": (run.get("floor") or {}).get("us_per_write"),
        "x_floor": (run.get("floor") or {}).get("server_ratio"),
    }


def summarize(groups: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for label, runs in groups.items():
        rows = [numbers(r) for r in runs]
        out[label] = {key: median([row[key] for row in rows]) for key in rows[0]} if rows else {}
        out[label]["runs"] = len(rows)
    return out


def print_table(summary: dict[str, dict[str, float | None]]) -> None:
    cols = ["runs", "deliveries_per_s", "cpu_us_per_delivery", "router_us", "shard_us", "p50_ms", "p99_ms",
            "lost", "rss_kib_per_conn", "joins_per_s", "foreign_cores", "floor_us", "x_floor"]
    print("| group | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for label, row in summary.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def plot(groups: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cpu = {k[4:]: v for k, v in groups.items() if k.startswith("cpu:")}
    ladder = {k[7:]: v for k, v in groups.items() if k.startswith("ladder:")}
    rss = {k[4:]: v for k, v in groups.items() if k.startswith("rss:")}
    panels = [p for p in (cpu, ladder, rss) if p]
    widths = [1.3 if p is ladder else 1.0 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), width_ratios=widths)
    axes = list(axes) if len(panels) > 1 else [axes]
    ax_iter = iter(axes)
    if cpu:
        ax = next(ax_iter)
        labels = list(cpu)
        med = [summarize({k: cpu[k]})[k] for k in labels]
        routers = [m["router_us"] or 0 for m in med]
        shards = [m["shard_us"] or 0 for m in med]
        ax.bar(labels, routers, label="routers", color="#4c72b0")
        ax.bar(labels, shards, bottom=routers, label="shards", color="#dd8452")
        for i, m in enumerate(med):
            ax.text(i, (routers[i] + shards[i]) * 1.02, f"{m['cpu_us_per_delivery']:.1f}", ha="center", fontsize=8)
        ax.axhline(5, color="grey", linestyle="--", linewidth=1)
        ax.text(len(labels) - 0.6, 5.2, "goal: 5 us", ha="right", fontsize=7, color="dimgrey")
        ax.set_ylabel("server CPU per delivery (us)")
        ax.set_title("10 rooms x 50, 1000 msg/s", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    if ladder:
        ax = next(ax_iter)
        top = 0.0
        for label, runs in ladder.items():
            rows = sorted(
                ((r["traffic"]["target_send_per_s"] * (r["config"]["members"] - 1) / 1000, numbers(r)) for r in runs),
                key=lambda row: row[0],
            )
            xs = [x for x, _ in rows]
            ys = [(n["deliveries_per_s"] or 0) / 1000 for _, n in rows]
            top = max(top, *xs)
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for (x, n), y in zip(rows, ys):
                if n["lost"] or (n["p99_ms"] or 0) > 50:
                    ax.plot([x], [y], marker="o", markersize=9, markerfacecolor="white", color=line.get_color())
        ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("offered deliveries/s (thousands)")
        ax.set_ylabel("delivered deliveries/s (thousands)")
        ax.set_title("throughput (hollow: loss or p99 > 50 ms)", fontsize=9)
        ax.legend(fontsize=7)
    if rss:
        ax = next(ax_iter)
        labels = list(rss)
        vals = [summarize({k: rss[k]})[k]["rss_kib_per_conn"] or 0 for k in labels]
        ax.bar(labels, vals, color="#55a868")
        for i, v in enumerate(vals):
            ax.text(i, v * 1.02, f"{v:.1f}", ha="center", fontsize=8)
        ax.axhline(10, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel("RSS per idle connection (KiB)")
        ax.set_title("10,000 joined connections", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="LABEL=GLOB")
    p.add_argument("--plot", default=None, help="PNG to draw")
    args = p.parse_args()
    groups = {}
    for spec in args.groups:
        label, _, pattern = spec.partition("=")
        groups[label] = load(pattern)
    print_table(summarize(groups))
    if args.plot:
        plot(groups, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
