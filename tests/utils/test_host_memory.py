"""Retaining freed host memory: a repeated step stops page-faulting (counted by the kernel)."""
import subprocess
import sys
import textwrap

import pytest

from d2kd.utils.host_memory import retain_freed_host_memory

# A "training step" that needs three 30 MiB blocks at once. The process starts from glibc's
# static state (set explicitly: what glibc's *dynamic* thresholds do depends on the process's
# allocation history, which differs between machines): every block above 128 KiB is mapped
# and unmapped again when freed, so each step faults its 90 MiB in again.
STEP_FAULTS = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys, torch
    M_MMAP_THRESHOLD = -3
    assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    if sys.argv[1] == "retain":
        from d2kd.utils.host_memory import retain_freed_host_memory
        assert retain_freed_host_memory()
    def step():
        blocks = [torch.empty(30 * 2**20 // 4).fill_(1.0) for _ in range(3)]
        del blocks
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
# Faults per 30 MiB block: one per 4 KiB page, or one per 2 MiB page under transparent huge
# pages ("always"); the bounds below hold for both.
HUGE_PAGES_PER_BLOCK = 30 // 2


def _step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_not_faulted_in_again_each_step():
    assert _step_faults("mapped") >= 3 * HUGE_PAGES_PER_BLOCK  # the premise: glibc gives it back
    assert _step_faults("retain") < HUGE_PAGES_PER_BLOCK


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retaining_reports_success_on_glibc():
    assert retain_freed_host_memory() is True
