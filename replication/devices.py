"""Resolve the compute device and the compute dtypes from the hardware, once per process.

Why: on CPUs without native bf16 (AVX2-only laptops and servers) torch emulates bf16 and fp16
kernels, ~50x slower than float32; on CPUs with AVX512_BF16 or AMX, and on modern GPUs, bf16 is
several times faster than float32. A profile therefore never names a dtype: it says `auto`, and
`resolve_dtype` picks one here.

The rule (`auto`):
- CUDA: `bfloat16` where `torch.cuda.is_bf16_supported()` (Ampere and newer), else `float32`.
- CPU: `bfloat16` only where the CPU executes it natively, decided by a **check of the CPU
  flags** through torch's own cpuinfo (`torch.cpu._is_avx512_bf16_supported()` or
  `torch.cpu._is_amx_tile_supported()`), not by a timed probe (a probe on a shared 2-core
  machine is noisy; the flags are exact). The environment variables that cap torch's kernels
  are honoured: `ATEN_CPU_CAPABILITY=avx2|default` or `ONEDNN_MAX_CPU_ISA` below
  `AVX512_CORE_BF16` mean "no native bf16", so a machine with bf16 can rehearse the AVX2 path.
- anything else (MPS, ...): `float32`.

A dtype named explicitly (`float32`, `bfloat16`, `float16`) is kept, so a user can force either
path; `bfloat16` on a CUDA device without bf16 is refused with a message, and `bfloat16` on a
CPU without native support is allowed with a warning that it is emulated.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch

AUTO = "auto"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
"""What `model_dtype` and `select_dtype` accept."""

_LOW_PRECISION = ("bfloat16", "float16")
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX",
                     "AVX10_1_512_AMX_FP16", "ALL")


def resolve_device(device: str | torch.device | None) -> str:
    """`"auto"`/None -> `"cuda"` where a GPU is visible, else `"cpu"`; anything else is checked and kept."""
    if device is None or str(device) == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device)
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                         f"use device='cpu' or 'auto'")
    try:
        torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    return name


def _capped_by_environment() -> str | None:
    """Why torch may not use native bf16 kernels although the CPU has them (None: not capped)."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("default", "avx2", "avx"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return f"ONEDNN_MAX_CPU_ISA={isa}"
    return None


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> dict[str, Any]:
    """Facts behind the CPU decision: flags torch's cpuinfo reports, environment caps, the verdict."""
    avx512_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    capped = _capped_by_environment()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": avx512_bf16,
        "amx_tile": amx,
        "capped_by": capped,
        "native_bf16": (avx512_bf16 or amx) and capped is None,
    }


def cpu_has_native_bf16() -> bool:
    """True where this CPU runs bf16 matmuls natively (AVX512_BF16 or AMX) and torch may use them."""
    return bool(cpu_bf16_support()["native_bf16"])


def device_supports_bf16(device: str | torch.device) -> bool:
    """Whether bf16 runs natively on `device` (CPU: the flag check above; CUDA: torch's own check)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if kind == "cpu":
        return cpu_has_native_bf16()
    return False


def _check_name(name: Any, what: str) -> str:
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if not isinstance(name, str) or name not in DTYPE_CHOICES:
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(map(repr, DTYPE_CHOICES))}")
    return name


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu", what: str = "dtype") -> str:
    """The dtype name to compute in on `device`: `auto` resolved by the rule above, others checked.

    None means float32 (the pre-`auto` meaning of an unset `select_dtype`). Raises ValueError for an
    unknown name, or for bf16/fp16 forced on a CUDA device that cannot run it.
    """
    if name is None:
        return "float32"
    name = _check_name(name, what)
    device = resolve_device(device)
    if name == AUTO:
        return "bfloat16" if device_supports_bf16(device) else "float32"
    kind = torch.device(device).type
    if name == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{what} 'bfloat16' forced on {torch.cuda.get_device_name(device)}, which cannot run bf16; "
                         f"use 'auto' or 'float32'")
    if name in _LOW_PRECISION and kind == "cpu" and not cpu_has_native_bf16():
        _warn_emulated(name, what)
    return name


@functools.lru_cache(maxsize=None)
def _warn_emulated(name: str, what: str) -> None:
    info = cpu_bf16_support()
    warnings.warn(f"{what} {name!r} forced on a CPU without native bf16 (capability {info['capability']}"
                  f"{', ' + info['capped_by'] if info['capped_by'] else ''}): torch emulates it, ~50x slower than "
                  f"float32. Use 'auto' to get float32 here.", RuntimeWarning, stacklevel=3)


def resolved_dtypes(model_dtype: str | None, select_dtype: str | None, device: str | torch.device = "cpu") -> dict[str, str]:
    """`{"model": ..., "select": ...}`: what figure JSONs record at `params.resolved_dtypes`."""
    return {"model": resolve_dtype(model_dtype, device, "model_dtype"),
            "select": resolve_dtype(select_dtype, device, "select_dtype")}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """torch.dtype for a dtype name ("float32", "torch.bfloat16", ...; None -> float32).

    Weights may be float64 as well as the compute dtypes; `auto` must be resolved first.
    """
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name == AUTO:
        raise ValueError("dtype 'auto' must be resolved with resolve_dtype(name, device) first")
    key = str(name).removeprefix("torch.")
    if not isinstance(getattr(torch, key, None), torch.dtype):
        raise ValueError(f"unknown dtype {name!r} (use e.g. 'float32', 'float64', 'bfloat16')")
    return getattr(torch, key)


def describe() -> dict[str, Any]:
    """What `auto` picks on this machine and why (bench output, figure JSONs, bug reports)."""
    device = resolve_device(AUTO)
    out: dict[str, Any] = {"auto_device": device, "cpu": dict(cpu_bf16_support()),
                           "auto_dtype_cpu": resolve_dtype(AUTO, "cpu")}
    if device == "cuda":
        out["cuda"] = {"name": torch.cuda.get_device_name(0), "bf16": device_supports_bf16("cuda"),
                       "auto_dtype_cuda": resolve_dtype(AUTO, "cuda")}
    return out


__all__ = [
    "AUTO", "DTYPE_CHOICES", "resolve_device", "resolve_dtype", "resolved_dtypes", "cpu_has_native_bf16",
    "cpu_bf16_support", "device_supports_bf16", "torch_dtype", "describe",
]
