"""Retaining freed host memory: a repeated step stops page-faulting (counted by the kernel)."""
import subprocess
import sys
import textwrap

import pytest

from d2kd.utils.host_memory import retain_freed_host_memory

# A "training step" that needs three 30 MiB blocks at once, after a process whose first large
# block was a single 30 MiB one: glibc's learned thresholds then trim the heap after every
# step, and each step faults its 90 MiB in again.
STEP_FAULTS = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "retain":
        from d2kd.utils.host_memory import retain_freed_host_memory
        assert retain_freed_host_memory()
    def step():
        blocks = [torch.empty(30 * 2**20 // 4).fill_(1.0) for _ in range(3)]
        del blocks
    torch.empty(30 * 2**20 // 4).fill_(1.0)
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _step_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_not_faulted_in_again_each_step():
    pages_per_block = 30 * 2**20 // 4096
    assert _step_faults("default") >= pages_per_block  # the premise: glibc gives it back
    assert _step_faults("retain") < pages_per_block // 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retaining_reports_success_on_glibc():
    assert retain_freed_host_memory() is True
