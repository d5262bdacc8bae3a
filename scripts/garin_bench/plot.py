"""The PNG: deliveries/s, latency percentiles and CPU over the run, per second.

matplotlib is optional; `plot()` returns why it did not draw instead of failing.
"""

from __future__ import annotations

from typing import Any


def plot(result: dict[str, Any], path: str) -> str | None:
    """Write the PNG; None on success, else the reason it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"

    rows = result["timeline"]
    if not rows:
        return "no timeline"
    t = [row["t_s"] + 0.5 for row in rows]
    phases = result["phases_s"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True, constrained_layout=True)
    ax_rate, ax_lat, ax_cpu = axes

    def shade(ax: Any) -> None:
        ax.axvspan(0, phases["warmup"], color="0.9", lw=0)
        end = phases["warmup"] + phases["window"]
        ax.axvspan(end, end + phases["drain"], color="0.9", lw=0)
        ax.grid(True, alpha=0.3)

    ax_rate.plot(t, [row["deliveries"] for row in rows], label="deliveries/s", color="C0")
    ax_rate.set_ylabel("deliveries per second", color="C0")
    ax_rate.set_ylim(bottom=0)
    ax_sent = ax_rate.twinx()
    ax_sent.plot(t, [row["sent"] for row in rows], label="messages sent/s", color="C1", ls="--")
    ax_sent.set_ylabel("messages sent per second", color="C1")
    ax_sent.set_ylim(bottom=0)
    lines = ax_rate.get_lines() + ax_sent.get_lines()
    ax_rate.legend(lines, [str(line.get_label()) for line in lines], loc="lower center")
    shade(ax_rate)

    for key, color in (("p50_ms", "C2"), ("p90_ms", "C0"), ("p99_ms", "C3"), ("max_ms", "0.5")):
        points = [(x, row[key]) for x, row in zip(t, rows) if row[key] is not None]
        if points:
            ax_lat.plot([p[0] for p in points], [p[1] for p in points], label=key[:-3], color=color)
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_lat.set_ylabel("latency, ms (by receive second)")
    ax_lat.legend(loc="upper right")
    shade(ax_lat)

    for key, label, color in (
        ("server_cpu_cores", "server (process tree)", "C3"),
        ("client_cpu_cores", "benchmark workers", "C0"),
        ("machine_busy_cores", "whole machine", "0.5"),
    ):
        points = [(x, row[key]) for x, row in zip(t, rows) if row.get(key) is not None]
        if points:
            ax_cpu.plot([p[0] for p in points], [p[1] for p in points], label=label, color=color)
    ax_cpu.axhline(result["machine"]["cpus"], color="k", lw=0.8, ls=":")
    ax_cpu.set_ylabel("CPU, cores")
    ax_cpu.set_xlabel("seconds since senders started (grey: warmup and drain)")
    ax_cpu.legend(loc="upper right")
    shade(ax_cpu)

    cfg = result["config"]
    lat = result["latency_ms"]
    fig.suptitle(
        f"garin bench: {cfg['rooms']} rooms x {cfg['members']} members, {cfg['senders']} senders/room "
        f"every {cfg['interval_s']:g}s; {result['traffic']['deliveries_per_s']:,.0f} deliveries/s, "
        f"p50 {lat['p50']} ms, p99 {lat['p99']} ms",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
