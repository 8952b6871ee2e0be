"""What the CPU can do: its vector and matrix extensions, from /proc/cpuinfo (standard library).

CPU engines' speed and, for OpenVINO's int8 kernels, their results depend on them: AVX2 alone,
AVX-512, VNNI (8-bit dot products accumulated in 32 bits), AVX512-BF16 and AMX (tile matrix
units for bf16 and int8). Off Linux, or where the file cannot be read, nothing is known.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import FrozenSet, List

#: (flag in /proc/cpuinfo, name said to the user), in the order the machine line lists them
EXTENSIONS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX512-VNNI"),
              ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"),
              ("avx512_fp16", "AVX512-FP16"), ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8"))


@lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The flags of the first processor in /proc/cpuinfo (empty when unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> str:
    """'AMD EPYC (AVX2, AVX-512, AVX512-VNNI, ...)': the CPU and what it computes with."""
    return f"{model_name()} ({', '.join(extensions()) or 'no AVX2'})"


def extensions() -> List[str]:
    """The vector / matrix extensions present, e.g. ['AVX2'] or ['AVX2', 'AVX-512', ...]."""
    flags = cpu_flags()
    return [name for flag, name in EXTENSIONS if flag in flags]


def has_vnni() -> bool:
    """8-bit dot products with 32-bit accumulation (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16). Without it, bf16 is emulated:
    PyTorch's bf16 feature half of tbn_swin_t ran 6x slower than fp32 on an AVX2 CPU."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
