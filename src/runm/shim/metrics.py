"""runc's stats event (what the guest's `runc events --stats` prints) as containerd's
`io.containerd.cgroups.v2.Metrics`, the answer to the shim's Stats."""

from __future__ import annotations

from typing import Any

from runm.proto import agent as agent_api
from runm.proto import task as api


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def metrics_from_runc_stats(event: dict[str, Any]) -> api.Metrics:
    data = event.get("data") or {}
    cpu = data.get("cpu") or {}
    usage = cpu.get("usage") or {}
    throttling = cpu.get("throttling") or {}
    memory = data.get("memory") or {}
    mem_usage = memory.get("usage") or {}
    swap = memory.get("swap") or {}
    raw = memory.get("raw") or {}
    pids = data.get("pids") or {}
    stat = api.MemoryStat(**{key: _int(raw.get(key)) for key in api.MEMORY_STAT_KEYS})
    stat.usage = _int(mem_usage.get("usage"))
    stat.usage_limit = _int(mem_usage.get("limit"))
    stat.max_usage = _int(mem_usage.get("max"))
    # runc reports swap as memory+swap (cgroup v1's memsw); cgroup v2 counts swap alone
    stat.swap_usage = max(0, _int(swap.get("usage")) - stat.usage)
    stat.swap_limit = _int(swap.get("limit"))
    return api.Metrics(
        pids=api.PidsStat(current=_int(pids.get("current")), limit=_int(pids.get("limit"))),
        cpu=api.CPUStat(usage_usec=_int(usage.get("total")) // 1000,
                        user_usec=_int(usage.get("user")) // 1000,
                        system_usec=_int(usage.get("kernel")) // 1000,
                        nr_periods=_int(throttling.get("periods")),
                        nr_throttled=_int(throttling.get("throttledPeriods")),
                        throttled_usec=_int(throttling.get("throttledTime")) // 1000),
        memory=stat,
        memory_events=api.MemoryEvents(oom_kill=_int(event.get(agent_api.OOM_KILLS_KEY))),
    )
