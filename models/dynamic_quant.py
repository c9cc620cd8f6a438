"""Dynamic int8 / FP8 linear layers for the transformer blocks (the fast path's `int8-dynamic` and `fp8-dynamic`).

Weights are quantized once, per output channel (symmetric absmax); activations are quantized on every call, per
token (per row). The product runs on the integer or FP8 tensor cores (torch._int_mm: int8 × int8 → int32;
torch._scaled_mm: e4m3 × e4m3 with row and column scales) and is rescaled to the layer's dtype. Without
torch.compile the quantization of activations is a few separate element-wise kernels per layer, which eats much of
the gain; with it they fuse into the neighbouring ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("int8", "fp8")
_INT8_MAX = 127.0
_FP8 = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
# On CUDA torch._int_mm wants more than 16 rows and torch._scaled_mm every dimension of mat1 a multiple of 16:
# rows are padded to a multiple of 16, at least 32.
_ALIGN = 16


class DynamicQuantLinear(nn.Module):
    """An nn.Linear whose matrix product runs in int8 or FP8 with dynamic per-token activation scales."""

    def __init__(self, linear: nn.Linear, kind: str) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown dynamic quantization {kind!r}: expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        weight = linear.weight.detach().float()
        limit = _INT8_MAX if kind == "int8" else _FP8_MAX
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / limit  # (out, 1)
        scaled = weight / scale
        quantized = scaled.round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8) if kind == "int8" else scaled.to(_FP8)
        self.register_buffer("weight_q", quantized.contiguous())  # (out, in): its .t() is column-major, as wanted
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, out), float32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight (callers such as diffusers read `.weight.dtype` / `.device`)."""
        return self.weight_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        pad = max(2 * _ALIGN, -(-m // _ALIGN) * _ALIGN) - m
        if pad and rows.is_cuda:
            rows = F.pad(rows, (0, 0, 0, pad))
        rows32 = rows.float()
        limit = _INT8_MAX if self.kind == "int8" else _FP8_MAX
        row_scale = rows32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / limit  # (m, 1)
        if self.kind == "int8":
            q = (rows32 / row_scale).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
            out = torch._int_mm(q, self.weight_q.t()).float() * row_scale * self.weight_scale
        else:
            q = (rows32 / row_scale).to(_FP8)
            out = torch._scaled_mm(
                q, self.weight_q.t(), scale_a=row_scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
            )
        out = out[:m].to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def quantize_linears(module: nn.Module, kind: str) -> int:
    """Replace every nn.Linear under `module` whose sizes the kernels take (multiples of 16) with a
    DynamicQuantLinear; returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.in_features % _ALIGN == 0 and child.out_features % _ALIGN == 0:
                setattr(parent, name, DynamicQuantLinear(child, kind))
                replaced += 1
    return replaced
