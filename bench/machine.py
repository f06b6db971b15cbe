"""What the benchmarks print about the machine they ran on, and how busy it was."""

from __future__ import annotations

import os
import platform

from kdray.predictor import available_cpus


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The CPU features that decide int8 speed (AVX2, AVX-512, VNNI): print them with every benchmark."""
    import re

    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(re.findall(r"\b(avx512[a-z0-9_]*|avx_vnni|avx2)\b", fh.read()))
    except OSError:
        return "unknown"
    return " ".join(sorted(flags)) or "none of avx2/avx512*/avx_vnni"


def machine() -> str:
    import onnxruntime
    import torch

    return (f"{platform.platform()}; {cpu_model()}; {os.cpu_count()} logical CPUs ({available_cpus()} available); "
            f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by the whole machine since boot, CPU seconds used by this process)."""
    fields = _proc_stat_cpu()
    if fields:
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        machine_s = busy / os.sysconf("SC_CLK_TCK")
    else:
        machine_s = float("nan")
    t = os.times()
    return machine_s, t.user + t.system


def others_share(start: tuple[float, float], wall: float) -> float:
    """Share of the machine's CPU time that other processes used during the run (0 = we had it alone)."""
    machine_s, own_s = cpu_seconds()
    return max(0.0, (machine_s - start[0]) - (own_s - start[1])) / (wall * available_cpus())


def cpu_ticks() -> list[int]:
    """The machine's CPU time counters from /proc/stat (user, nice, system, idle, iowait, irq, softirq, steal)."""
    return _proc_stat_cpu()[:8]


def _proc_stat_cpu() -> list[int]:
    """Every counter of /proc/stat's ``cpu`` line (clock ticks); empty where there is no /proc."""
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the machine's CPU time between two :func:`cpu_ticks` that the hypervisor gave to other guests
    (steal): time this box's cores did not run at all. It slows wall-clock rates, not CPU-time ones."""
    if len(before) < 8 or len(after) < 8:
        return float("nan")
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / max(1, sum(delta))
