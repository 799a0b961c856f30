"""Peak resident memory of this process, for benchmarks (Linux /proc; CPU memory).

    with PeakMemory() as peak:
        work()
    peak.extra_mb   # highest RSS during the block minus the RSS at its start

The kernel's high-water mark (VmHWM) is reset to the current RSS at entry (writing 5 to
/proc/self/clear_refs), so ``extra_mb`` is the block's own peak above what was resident
before it. Run benchmarks with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=65536):
every large buffer then goes back to the OS when freed, and the RSS peak is the peak of live
tensors, not of the allocator's arena growth.
"""

from __future__ import annotations

import gc


def status_kb(field: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (then the
    peak includes everything since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak RSS above the RSS at entry (see module doc)."""

    def __enter__(self):
        gc.collect()
        self.before_kb = status_kb("VmRSS")
        self.exact = reset_peak()
        return self

    def __exit__(self, *exc):
        self.peak_kb = status_kb("VmHWM")
        self.extra_mb = (self.peak_kb - self.before_kb) / 1024
        return False
