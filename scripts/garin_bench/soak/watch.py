"""The server's processes during a soak: every --sample-every seconds the
RSS, open fds and CPU of each process of its tree, by role (supervisor,
router J, shard I); a process that restarts or goes missing is an error.
Afterwards, fds must get back to their idle count, and RSS must not keep
climbing (slopes per minute, after the warmup and over the last half).
"""

from __future__ import annotations

import os
from typing import Any

import trio

from garin_bench import procfs
from garin_bench.procfs import role_of
from garin_bench.server import SpawnedServer
from garin_bench.soak.records import Ledger, SoakPlan, now
from garin_bench.stats import slope_per_minute

IDLE_WAIT_S = 12.0  # for fds to get back to idle after the clients are gone


class ServerWatch:
    def __init__(self, plan: SoakPlan, ledger: Ledger, server_pid: int | None,
                 spawned: SpawnedServer | None) -> None:
        self.plan = plan
        self.ledger = ledger
        self.server_pid = server_pid
        self.spawned = spawned
        self.samples: list[dict[str, Any]] = []
        self.role_pids: dict[str, int] = {}
        self.roles_by_pid: dict[int, str] = {}
        self.idle_before: dict[str, dict[str, float]] = {}
        self.idle_after: dict[str, dict[str, float]] = {}

    def take_sample(self) -> dict[str, Any] | None:
        if self.server_pid is None:
            return None
        procs: dict[str, dict[str, float]] = {}
        for pid in procfs.process_tree(self.server_pid):
            role = self.roles_by_pid.get(pid)
            if role is None:
                role = self.roles_by_pid[pid] = role_of(pid)
            rss, fds, cpu = procfs.rss_kib(pid), procfs.open_fds(pid), procfs.cpu_seconds(pid)
            if rss is None or fds is None or cpu is None:
                continue
            if role in procs:
                role = f"{role} (pid {pid})"
            procs[role] = {"pid": pid, "rss_kib": rss, "fds": fds, "cpu_s": round(cpu, 2)}
            known = self.role_pids.setdefault(role, pid)
            if known != pid:
                self.ledger.error("server process restarted", f"{role}: pid {known} -> {pid}")
                self.role_pids[role] = pid
        return {"t": round(now() - self.plan.t0, 2), "procs": procs}

    def _check_alive(self) -> None:
        if self.server_pid is not None and not os.path.exists(f"/proc/{self.server_pid}"):
            self.ledger.error("server process gone", str(self.server_pid))
            self.plan.cut = True
        elif self.spawned is not None and self.spawned.process is not None and self.spawned.process.poll() is not None:
            self.ledger.error("spawned server exited during the soak", f"code {self.spawned.process.returncode}")
            self.plan.cut = True
        if self.samples and self.role_pids:
            latest = self.samples[-1]["procs"]
            for role, pid in self.role_pids.items():
                if role not in latest:
                    self.ledger.error("server process missing", f"{role} (pid {pid})")

    async def sampler(self, cancel: trio.CancelScope) -> None:
        while True:
            sample = self.take_sample()
            if sample is not None:
                sample.update(self._client_counts())
                self.samples.append(sample)
                self._check_alive()
                if self.plan.cut:
                    cancel.cancel()
                    return
            await trio.sleep(self.plan.args.sample_every)

    def _client_counts(self) -> dict[str, int]:
        ledger = self.ledger
        return {"client_connections": ledger.open_conns, "sent": ledger.sent, "deliveries": ledger.deliveries,
                "errors": sum(ledger.errors.values())}

    def final_sample(self) -> None:
        """As the clients go: kept, but not part of the run's trend."""
        self.samples.append({**(self.take_sample() or {}), **self._client_counts(), "final": True})

    def idle_fds(self) -> dict[str, dict[str, float]]:
        sample = self.take_sample()
        return {} if sample is None else sample["procs"]

    async def wait_idle(self) -> None:
        """Until every process is back to its idle fd count (or the wait is over)."""
        deadline = now() + IDLE_WAIT_S
        while True:
            self.idle_after = self.idle_fds()
            over = {role: p["fds"] - self.idle_before.get(role, p)["fds"] for role, p in self.idle_after.items()}
            if all(v <= 0 for v in over.values()) or now() > deadline:
                break
            await trio.sleep(0.5)
        for role, extra in over.items():
            if extra > 0:
                self.ledger.error("fds not back to idle after the soak",
                           f"{role}: {self.idle_before.get(role, {}).get('fds')} idle before, "
                           f"{self.idle_after[role]['fds']} {IDLE_WAIT_S:g}s after the last client")

    def analyse_processes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        roles: list[str] = []
        for s in self.samples:
            for role in s.get("procs", {}):
                if role not in roles:
                    roles.append(role)
        for role in roles:
            series = [(s["t"], s["procs"][role], bool(s.get("final")))
                      for s in self.samples if role in s.get("procs", {})]
            if not series:
                continue
            # The last sample is taken as the clients go: not part of the run's trend.
            running = [(t, p) for t, p, final in series if not final] or [(t, p) for t, p, _ in series]
            row: dict[str, Any] = {"pid": running[-1][1]["pid"]}
            for key in ("rss_kib", "fds"):
                values = [p[key] for _, p in running]
                row[key] = {
                    "start": values[0], "end": values[-1], "max": max(values), "min": min(values),
                    "slope_per_min_after_warmup": slope_per_minute(
                        [(t, p[key]) for t, p in running if t >= self.plan.args.warmup]
                    ),
                    # A leak keeps climbing; an allocator warming up levels off.
                    "slope_per_min_last_half": slope_per_minute(
                        [(t, p[key]) for t, p in running if t >= running[-1][0] / 2]
                    ),
                }
            if len(running) >= 2 and running[-1][0] > running[0][0]:
                row["cpu_share"] = round(
                    (running[-1][1]["cpu_s"] - running[0][1]["cpu_s"]) / (running[-1][0] - running[0][0]), 3)
            row["idle_fds_before"] = self.idle_before.get(role, {}).get("fds")
            row["idle_fds_after"] = self.idle_after.get(role, {}).get("fds")
            row["idle_rss_kib_before"] = self.idle_before.get(role, {}).get("rss_kib")
            row["idle_rss_kib_after"] = self.idle_after.get(role, {}).get("rss_kib")
            out[role] = row
        return out
