"""What a benchmark ran on: CPU model, the instruction sets that pick kernels, the bitsandbytes path.

Numbers from two machines are only comparable when these match: torch and bitsandbytes choose
AVX2, AVX-512, AVX512-BF16/VNNI or AMX kernels at run time, and bitsandbytes' 4-bit and int8 CPU
paths differ between them (see ``dlis_market.inference.quantization``). Every bench JSON carries
``"machine": machine_info()``; scripts in bench/ import it as ``from machine_info import machine_info``.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

# CPU flags that change which kernels torch / bitsandbytes run (Linux /proc/cpuinfo names).
KERNEL_FLAGS_PREFIXES = ("avx2", "avx512", "amx", "fma", "f16c")


def _cpuinfo() -> tuple[str, list[str]]:
    """(model name, kernel-relevant flags) from /proc/cpuinfo; platform's answer elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, the model name from platform is all there is
        return platform.processor() or platform.machine(), []
    model, flags = "", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = sorted(f for f in value.split() if f.startswith(KERNEL_FLAGS_PREFIXES))
    return model or platform.machine(), flags


def bitsandbytes_backend() -> dict[str, Any]:
    """Which CPU kernels bitsandbytes uses on this machine (imported the way the project does)."""
    import torch

    # Through the project's module, which silences bitsandbytes' hub-kernel warning before import.
    from dlis_market.inference.quantization import bitsandbytes_module

    bnb = bitsandbytes_module()

    bnb_cpu_ops = importlib.import_module("bitsandbytes.backends.cpu.ops")
    return {
        "version": bnb.__version__,
        # torch._int_mm for int8 matmul and the AVX-512 4-bit fallbacks follow torch's capability.
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_paths": bool(getattr(bnb_cpu_ops, "_has_avx512", False)),
        # The native library's own CPUID check: packed AVX512-BF16 4-bit gemm in eval mode.
        "avx512bf16_native": bool(bnb.functional.has_avx512bf16()),
        # The `kernels` hub gemm, only when that package is installed and online.
        "hub_gemm_4bit_kernel": getattr(bnb_cpu_ops, "gemm_4bit_forward_kernel", None) is not None,
    }


def machine_info() -> dict[str, Any]:
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes_backend(),
    }


def write_result(result: dict[str, Any], out: Path) -> None:
    """A bench's closing lines: record the load average and the machine, write the JSON, say where."""
    result["loadavg"] = os.getloadavg()
    result["machine"] = machine_info()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load {result['loadavg']}; wrote {out}")


if __name__ == "__main__":
    print(json.dumps(machine_info(), indent=2))
