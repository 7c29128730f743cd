"""The current process's memory as Linux reports it (``/proc/self``), for the benchmarks."""
from typing import Optional


def status_mb(field: str) -> Optional[float]:
    """A memory field of ``/proc/self/status`` (reported in kB, e.g. ``VmRSS``, ``VmHWM``) in
    MB; None where there is no such file or field (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> None:
    """Reset the process's peak resident size (``VmHWM``) to its current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
