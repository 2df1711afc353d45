"""What every benchmark line records about the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import platform


def cpu_model() -> str:
  """The processor's marketing name (Linux /proc/cpuinfo), else the architecture."""
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # not Linux: fall through
    for line in f:
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def machine() -> str:
  """CPU model and core count, e.g. 'AMD EPYC 7B13, 2 cores, Linux'."""
  return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}"
