"""What this CPU offers the kernels: its x86 instruction-set extensions, read once from /proc/cpuinfo.

The kernels are chosen per machine from these (ops.py holds the rules): AVX2 + FMA for the packed-weight
products (the baseline the native build needs), AVX-512 with BF16 for dequantising into the matrix engine's
format, AMX (bf16 tiles, or int8 tiles with the int8 kernels' activations) for many-row products, AVX-512 VNNI for the
int8-activation row kernels. GEMMA4_MATRIX_ENGINE=off turns the matrix engine off and GEMMA4_ROW_KERNELS=avx2 takes
the 256-bit row kernels (to compare with the path beside each).
"""

from __future__ import annotations

import functools
import os

# Each extension's /proc/cpuinfo flag, in the order `describe` prints them.
_NAMES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
          "avx512vl": "AVX-512VL", "avx512_vnni": "AVX-512VNNI", "avx512_bf16": "AVX-512BF16",
          "avx512_fp16": "AVX-512FP16", "avx_vnni": "AVX-VNNI", "amx_tile": "AMX-TILE", "amx_bf16": "AMX-BF16",
          "amx_int8": "AMX-INT8"}

# The matrix engine dequantises with AVX-512 (BW, BF16) and multiplies on AMX bf16 tiles.
MATRIX_ENGINE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")
# The int8-activation row kernel for int8 weights on 512-bit registers (row_products_avx512.cpp: decode, verify and
# few-row steps).
WIDE_ROWS_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
# The int8 tile products (amx_products.cpp) rescale their sums with AVX-512 and multiply on AMX int8 tiles.
AMX_INT8_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "amx_tile", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not there to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has(*flags: str) -> bool:
    return all(f in cpu_flags() for f in flags)


def matrix_engine_mode() -> str:
    """GEMMA4_MATRIX_ENGINE: "on" (the default: each product's way by the measured rule), "off", "bf16" (quantised
    weights only dequantised to bf16) or "int8" (on int8 tiles wherever the layout allows): the last two compare."""
    mode = os.environ.get("GEMMA4_MATRIX_ENGINE", "on")
    if mode not in ("on", "off", "bf16", "int8"):
        raise ValueError(f"GEMMA4_MATRIX_ENGINE: {mode!r} is none of on, off, bf16, int8")
    return mode


def row_kernels() -> str:
    """GEMMA4_ROW_KERNELS: the int8-activation row kernels to run, "avx512" (512-bit VNNI for int8 weights, the others
    256-bit: the default where the CPU has WIDE_ROWS_FLAGS) or "avx2" (the 256-bit ones other CPUs run; forced here to
    compare: they give the same bits)."""
    mode = os.environ.get("GEMMA4_ROW_KERNELS", "auto")
    if mode not in ("auto", "avx2", "avx512"):
        raise ValueError(f"GEMMA4_ROW_KERNELS: {mode!r} is none of auto, avx2, avx512")
    if mode == "avx512" and not has(*WIDE_ROWS_FLAGS):
        raise ValueError("GEMMA4_ROW_KERNELS=avx512: this CPU lacks AVX-512 F/BW/VL/DQ/VNNI")
    if mode == "auto":
        return "avx512" if has(*WIDE_ROWS_FLAGS) else "avx2"
    return mode


def matrix_engine_wanted() -> bool:
    """Whether the CPU has what the matrix-engine path needs and it is not turned off (GEMMA4_MATRIX_ENGINE=off)."""
    return has(*MATRIX_ENGINE_FLAGS) and matrix_engine_mode() != "off"


def describe() -> str:
    """The extensions the kernels look at, as one line: 'AVX2 FMA F16C AVX-512F ... AMX-BF16'."""
    return " ".join(name for flag, name in _NAMES.items() if flag in cpu_flags()) or "none of AVX2, AVX-512, AMX"


def kernel_plan() -> str:
    """Which products the kernels run where, on this CPU (without building them): one line for `gemma4 info`."""
    if not has("avx2", "fma"):
        return "plain torch (this CPU lacks AVX2/FMA)"
    tiles = {"on": "; int4 weights on AMX bf16 tiles, int8 ones on AMX int8 tiles, by rows",
             "int8": "; AMX int8 tiles"}.get(matrix_engine_mode(), "") if has(*AMX_INT8_FLAGS) else ""
    rows = ("int8-activation AVX2 kernels (AVX-512 VNNI for int8 weights)" if row_kernels() == "avx512"
            else "int8-activation AVX2 kernels")
    prefill = (f"matrix engine (AVX-512 BF16 dequantisation, AMX bf16 GEMM{tiles})" if matrix_engine_wanted()
               else rows)
    return f"decode: {rows}; prefill: {prefill}"
