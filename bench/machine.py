"""What else the machine was doing while a benchmark measured: load average, and the CPU
share other processes took during one measurement.

The load average only says what happened over the last minute; ``OtherCpu`` says how much of
the CPUs processes other than ours (and the hypervisor, as steal time) used during exactly
the seconds measured, so a round disturbed by someone else's job can be seen as such.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
#: A 1-minute load average above this is printed as a warning: timings taken then are not
#: trustworthy on a 2-CPU machine.
BUSY_LOAD = 0.5


def load_line(when: str, timings: bool = True) -> str:
    """``when``, the local time and the load averages, with a warning when busy (unless
    what is measured is no timing)."""
    load = os.getloadavg()
    return (f"{when} {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: load average {load[0]:.2f} "
            f"{load[1]:.2f} {load[2]:.2f}"
            + ("  (machine busy: timings are not trustworthy)"
               if timings and load[0] > BUSY_LOAD else ""))


def _busy_ticks() -> int:
    """Ticks all CPUs spent not idle (user, nice, system, irq, softirq, steal) since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def process_ticks(pid: int) -> int:
    """User + system ticks of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class OtherCpu:
    """Share of all CPUs used by processes other than ``pids`` between start() and stop()."""

    def __init__(self, *pids: int) -> None:
        self.pids = (os.getpid(), *pids)
        self.share = 0.0

    def _sample(self) -> tuple[float, int, int]:
        own = 0
        for pid in self.pids:
            try:
                own += process_ticks(pid)
            except OSError:
                pass
        return time.monotonic(), _busy_ticks(), own

    def __enter__(self) -> "OtherCpu":
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        seconds = end[0] - self._start[0]
        other = (end[1] - self._start[1]) - (end[2] - self._start[2])
        capacity = seconds * TICKS * (os.cpu_count() or 1)
        self.share = max(0.0, other / capacity) if capacity > 0 else 0.0
