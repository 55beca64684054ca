"""Dtype names: safetensors' strings are the lingua franca of plans and reports; torch only at the edges."""
from __future__ import annotations

from ..errors import CheckpointError

# safetensors dtype string → bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# the CLI's --dtype names
CLI_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}

_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_FROM_TORCH = {v: k for k, v in _TORCH_NAMES.items()}


def torch_name(dtype: str) -> str:
    """The name config.json's torch_dtype uses ("bfloat16")."""
    return _TORCH_NAMES[dtype]


def to_torch(dtype: str):
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def from_torch(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _FROM_TORCH:
        raise CheckpointError(f"tensor dtype {name} is not supported (expected one of "
                              f"{', '.join(sorted(_FROM_TORCH))})")
    return _FROM_TORCH[name]


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def describe_cast(src: str, dst: str) -> str:
    """One phrase on what a cast loses, for the log."""
    if src == dst:
        return "unchanged"
    lost = MANTISSA_BITS.get(src, 0) - MANTISSA_BITS.get(dst, 0)
    if lost > 0:
        return (f"{src} → {dst}: {lost} mantissa bits dropped "
                f"(relative rounding error up to 2^-{MANTISSA_BITS[dst] + 1})")
    if src == "BF16" and dst == "F16":
        return f"{src} → {dst}: exponent range narrows (values beyond ±65504 overflow to inf)"
    return f"{src} → {dst}: exact (wider type)"
