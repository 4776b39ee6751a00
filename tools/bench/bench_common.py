"""Shared by the PyTorch twins in tools/bench/ (imported as `bench_common`:
`python tools/bench/X.py` puts this folder on sys.path)."""


def peak_rss():
    """The process's peak resident set size in bytes (VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
