"""Whether this machine shows an NVIDIA GPU at all. Only the messages use it: when a GPU backend cannot run,
the first thing to say on a laptop without a GPU is that there is none, not which GPU package to install."""

from __future__ import annotations

import glob
import os

# What the NVIDIA driver creates: the desktop driver's device nodes and /proc entry, Jetson's integrated GPU,
# WSL2's GPU paravirtualisation device.
DRIVER_SIGNS = ("/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/nvhost-ctrl-gpu", "/dev/nvgpu/igpu0/ctrl",
                "/dev/dxg")


def nvidia_gpu_missing() -> str | None:
    """Why no NVIDIA GPU is visible here, or None when the driver shows one (or when this is not Linux)."""
    if not os.path.isdir("/proc"):
        return None
    if any(os.path.exists(sign) for sign in DRIVER_SIGNS) or glob.glob("/dev/nvidia[0-9]*"):
        return None
    return "no NVIDIA GPU or driver is visible on this machine (no /dev/nvidia*, /proc/driver/nvidia or Jetson GPU)"
