"""Device and dtype name resolution for the render path."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CUDA_INDEXED = re.compile(r"cuda:(\d+)")

# Accepted spellings; configs and CLIs use both the long torch names and the short ones.
_DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(name: str = "auto") -> str:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a concrete torch device string."""
    import torch

    normalized = name.strip().lower()
    if normalized == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if normalized in ("cpu", "cuda") or _CUDA_INDEXED.fullmatch(normalized):
        return normalized
    raise ValueError(f"Unknown device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' (e.g. 'cuda:0').")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Turn "auto" or a dtype name into a torch.dtype; "auto" is float16 on CUDA and float32 on CPU."""
    import torch

    normalized = name.strip().lower()
    if normalized == "auto":
        # fp16 halves memory and uses tensor cores on GPUs; CPU kernels for fp16 are slow or missing.
        return torch.float16 if device.startswith("cuda") else torch.float32
    canonical = _DTYPE_ALIASES.get(normalized)
    if canonical is None:
        accepted = ", ".join(["auto", *_DTYPE_ALIASES])
        raise ValueError(f"Unknown dtype {name!r}: expected one of {accepted}.")
    return getattr(torch, canonical)
