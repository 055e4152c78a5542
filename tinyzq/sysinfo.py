"""Process and machine facts for reports: peak RSS, CPU, versions."""
from __future__ import annotations

import os
import platform
import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def machine() -> dict:
    import numpy as np

    from . import kernels
    return {"machine": platform.machine(), "system": platform.system(), "python": platform.python_version(),
            "numpy": np.__version__, "cpus": os.cpu_count(), "isa": kernels.isa(), "threads": kernels.get_threads()}
