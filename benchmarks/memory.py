"""Memory readings the benchmarks share (Linux): current and peak resident set size."""

import resource

MIB = 1 << 20


def rss_now() -> int:
    """Bytes resident now."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    """Peak bytes resident in this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
