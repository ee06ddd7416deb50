"""What the machine computes with, printed beside every measured figure: a speed measured on a
CPU with AVX-512 BF16 does not hold on one with AVX2 only."""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """One line: CPU model, torch's CPU capability, bf16/AMX support, cores and threads, and the
    environment variables that limit torch's and oneDNN's kernels, when set."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                      if line.startswith("model name")), model)
        flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    amx = any(f.startswith("amx") for f in flags)
    gpu = (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    # kernels limited below what the CPU has (to measure another CPU class on this one)
    limits = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
              if os.environ.get(k)]
    limited = f"; kernels limited by {', '.join(limits)}" if limits else ""
    return (f"{model}; torch {torch.__version__} CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; bf16 {'yes' if bf16 else 'no'}, "
            f"AMX {'yes' if amx else 'no'}; {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY="
            f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}{gpu}{limited}")
