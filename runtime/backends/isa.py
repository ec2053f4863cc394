"""What this CPU's instruction set means for the reduced-precision variants (no torch, no onnxruntime).

int8: ONNX Runtime (MLAS) multiplies u8 activations by s8 weights on x86 with `vpmaddubsw` unless the CPU
has VNNI (AVX512-VNNI, AVX-VNNI or AMX): that instruction adds two u8 x s8 products into a *saturating*
int16, and 255 x 127 x 2 overflows it. On such CPUs (AVX2-only: Zen 1-3, Haswell to Skylake; AVX-512
without VNNI: Skylake-X) a model with s8 weights silently loses accuracy (benchmarks/README.md has the
figures); u8 weights take the u8 x u8 kernel, which widens to int16 first and does not saturate. ARM
(NEON dot products, Jetson) has no such limit.
bf16: without bf16 dot products in hardware OpenVINO runs a bf16 hint in fp32 or emulation.
"""

from __future__ import annotations

import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# bf16 dot products in hardware (Zen 4/5, Cooper Lake, Sapphire Rapids and later). Without them OpenVINO
# quietly runs a bf16 hint in fp32, so a bf16 variant's speed (and its label) would not hold.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# AMX tile matrix units (Sapphire Rapids and later): bf16 and int8 GEMMs several times the AVX-512 rate, which
# the bench's bf16 / int8 limits must be measured with (bench/gemm_limits.py).
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")
# The flags every report of a machine lists (bench, optimize's gated_on / timed_on).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def read_cpuinfo() -> tuple[str | None, set[str] | None, int | None]:
    """(model name, feature flags, physical cores) from /proc/cpuinfo; None for what cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None, None
    model, flags, cores, physical = None, None, set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model") and model is None:
            model = value
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    return model, flags, len(cores) or None


def cpu_flags() -> set[str] | None:
    """The CPU feature flags of /proc/cpuinfo, or None where they cannot be read (not Linux)."""
    return read_cpuinfo()[1]


def is_x86(machine: str | None = None) -> bool:
    return (machine if machine is not None else platform.machine()).lower() in X86_MACHINES


def signed_int8_saturates(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """True where ONNX Runtime's u8 x s8 kernels saturate: x86 without VNNI (or x86 whose flags are unknown)."""
    if not is_x86(machine):
        return False
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return True  # cannot tell: assume the common case without VNNI
    return not any(flag in flags for flag in VNNI_FLAGS)


def int8_weight_type(requested: str = "auto", flags: set[str] | None = None, machine: str | None = None
                     ) -> tuple[str, str]:
    """("s8" or "u8", why) for int8 weights: s8 where this CPU multiplies u8 x s8 exactly, else u8."""
    if requested not in ("auto", "s8", "u8"):
        raise ValueError(f"int8 weights must be auto, s8 or u8, not {requested!r}")
    if requested != "auto":
        return requested, "asked for"
    if signed_int8_saturates(flags, machine):
        return "u8", ("this x86 CPU has no VNNI: ONNX Runtime's u8 x s8 kernel saturates int16 sums here, "
                      "u8 x u8 does not")
    return "s8", "this CPU multiplies u8 x s8 without saturation (VNNI or ARM)"


def cpu_summary() -> dict:
    """The CPU an int8 variant was gated on, as recorded in the manifest."""
    model, flags = read_cpuinfo()[0], cpu_flags()  # flags through cpu_flags(), the one seam for flags
    return {"machine": platform.machine(), "cpu_model": model or platform.processor() or None,
            "vnni": None if flags is None else any(f in flags for f in VNNI_FLAGS),
            "signed_int8_saturates": signed_int8_saturates(flags),
            "bf16": None if flags is None else has_bf16(flags)}


def has_bf16(flags: set[str] | None = None) -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX-BF16); False where flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags) and any(flag in flags for flag in BF16_FLAGS)


def bf16_variant_problem(name: str, entry: dict) -> str | None:
    """Why a bf16 variant must not run on this CPU (no bf16 instructions), or None."""
    if entry.get("precision") != "bf16" or has_bf16():
        return None
    gated = (entry.get("gated_on") or {}).get("cpu_model") or "another CPU"
    return (f"{name} is bf16 (gated on {gated}); this CPU has none of {', '.join(BF16_FLAGS)}, so it would run "
            "in emulation or fp32 and the variant's speed and gate figures do not hold here")


def variant_problem(name: str, entry: dict, bundle: Path | str = "BUNDLE") -> str | None:
    """Why a gated variant cannot run on this CPU (s8 weights that saturate, bf16 without bf16), or None."""
    return int8_variant_problem(name, entry, bundle) or bf16_variant_problem(name, entry)


def int8_variant_problem(name: str, entry: dict, bundle: Path | str = "BUNDLE") -> str | None:
    """Why `entry` (a manifest variant) must not run on this CPU, or None: s8 weights where they saturate.

    Entries written before the weight type was recorded had s8 weights.
    """
    if entry.get("precision") != "int8" or entry.get("weights", "s8") != "s8" or not signed_int8_saturates():
        return None
    gated = (entry.get("gated_on") or {}).get("cpu_model") or "another CPU"
    return (f"{name} has s8 weights (gated on {gated}); this x86 CPU has no VNNI, so the u8 x s8 int8 kernel "
            f"(ONNX Runtime's, and OpenVINO's) saturates and the variant's gate figures do not hold here. Run "
            f"`edgeenc optimize {bundle}` on this machine (it writes u8 weights), or use the fp32 model")
