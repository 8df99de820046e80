"""Linux process memory for the benchmarks: /proc/self/status lines and resetting the peak."""

from __future__ import annotations

from pathlib import Path


def status_mib(key: str) -> float:
    """A /proc/self/status memory line (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def overall_peak(row: dict) -> float:
    """A benchmark row's process peak: loading (before the reset) or training, whichever was higher."""
    return max(row["loaded_peak_mib"], row["train_peak_mib"])
