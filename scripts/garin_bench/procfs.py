"""What the benchmark reads from /proc: a server's process tree, its CPU and RSS.

The server is one PID and all of its descendants (`garin run` is a supervisor
with shard and router children, each in its own session, so process groups do
not find them: parent links do). CPU is utime+stime from /proc/PID/stat, summed
over the tree; a window's CPU is the difference of two samples. RSS is the sum
of VmRSS from /proc/PID/status (shared library pages are counted once per
process, as `ps` does; per-connection figures use differences, which cancel
that out). The whole machine's busy share comes from the first line of
/proc/stat.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("latin-1")
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    return raw[raw.rindex(")") + 2 :].split()


def parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            parents[int(name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """root and every live descendant (empty if root is gone)."""
    if not os.path.exists(f"/proc/{root}"):
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return sorted(tree)


def cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # stat(5): utime is field 14 and stime field 15, i.e. 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


def open_fds(pid: int) -> int | None:
    """How many file descriptors the process holds (None if it is gone or not ours)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    # `python -m garin shard --index 1` -> "garin shard --index 1"
    if "-m" in words:
        words = words[words.index("-m") + 1 :]
    return " ".join(words[:4])


def role_of(pid: int) -> str:
    """supervisor, router J or shard I, from the command line."""
    words = process_name(pid).split()
    if words[:2] == ["garin", "run"]:
        return "supervisor"
    if words[:2] == ["garin", "shard"] and len(words) > 3 and words[2] == "--index":
        return f"shard {words[3]}"
    if words[:2] == ["garin", "router"] and len(words) > 3 and words[2] == "--router-id":
        return f"router {words[3]}"
    return " ".join(words[:2]) or str(pid)


@dataclass(frozen=True, slots=True)
class TreeSample:
    pids: tuple[int, ...]
    cpu_s: float
    rss_kib: int
    per_pid_cpu_s: dict[int, float] = field(default_factory=dict)


def sample_tree(root: int) -> TreeSample:
    pids = process_tree(root)
    cpu_total = 0.0
    rss_total = 0
    per_pid: dict[int, float] = {}
    live = []
    for pid in pids:
        cpu = cpu_seconds(pid)
        rss = rss_kib(pid)
        if cpu is None or rss is None:
            continue  # exited between the listing and the read
        live.append(pid)
        per_pid[pid] = cpu
        cpu_total += cpu
        rss_total += rss
    return TreeSample(tuple(live), cpu_total, rss_total, per_pid)


def merged_samples(samples: list[TreeSample]) -> TreeSample:
    """Several trees as one (bench.py --hosts: every host's garin together)."""
    per_pid: dict[int, float] = {}
    for sample in samples:
        per_pid.update(sample.per_pid_cpu_s)
    return TreeSample(
        tuple(pid for sample in samples for pid in sample.pids),
        sum(sample.cpu_s for sample in samples),
        sum(sample.rss_kib for sample in samples),
        per_pid,
    )


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total
