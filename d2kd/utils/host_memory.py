"""Keep freed host memory in the process between training steps (glibc ``mallopt``).

glibc's malloc hands large blocks back to the kernel when they are freed — through ``munmap``
for blocks above a *dynamic* mmap threshold and by trimming the heap top above a trim threshold
— so a training step whose peak is not yet "learned" by those heuristics pays, every step, for
page faults that zero its fresh pages again. Measured on the DigitsDet Faster R-CNN pair (CPU,
2 threads): the distillation step (student + teacher + heads alive together) took ~30,000 minor
faults per step (~80 ms, 8 % of the step) while the student-alone step and the teacher forward
took none; with both thresholds fixed, no step faults. Fixing only one of them makes it worse
(setting any threshold switches glibc's dynamic adjustment off: a fixed trim threshold alone
leaves the mmap threshold at 128 KiB, and the step faults on nearly every tensor).

The cost: the heap no longer shrinks after the peak step, i.e. the resident size stays at the
peak the process reached (which the next step needs again anyway). Where the C library is not
glibc (macOS, musl) this does nothing. ``D2KD.RETAIN_HOST_MEMORY`` (off by default, a CPU
training tuning; the DigitsDet configs switch it on) controls it.
"""
import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's upper limit for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks
# above it are always mapped and unmapped.
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 2**31 - 1  # a C int: never trim in practice


def retain_freed_host_memory() -> bool:
    """Fix glibc's mmap threshold at its maximum and its trim threshold beyond reach, so that
    freed blocks stay in the process for the next step. Returns whether it took effect."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("Not retaining freed host memory: no glibc mallopt in this process.")
        return False
    done = (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1)
    if done:
        logger.info("Retaining freed host memory between steps (glibc mmap threshold 32 MiB, "
                    "no heap trimming; D2KD.RETAIN_HOST_MEMORY False switches it off).")
    return done
