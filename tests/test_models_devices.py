"""Tests for models.devices: device and dtype name resolution."""

from __future__ import annotations

import pytest
import torch

from models.devices import resolve_device, resolve_dtype


def test_auto_device_follows_cuda_availability() -> None:
    """ "auto" picks CUDA exactly when torch can see a GPU."""
    assert resolve_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device()


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:3", " CPU "])
def test_valid_device_names(name: str) -> None:
    """Explicit device names pass through normalised."""
    assert resolve_device(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "mps0", ""])
def test_invalid_device_names(name: str) -> None:
    """Unknown device names raise ValueError naming the bad value."""
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device(name)


def test_auto_dtype() -> None:
    """ "auto" is float16 on CUDA and float32 on CPU."""
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("auto", "cuda:1") is torch.float16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
    ],
)
def test_named_dtypes(name: str, expected: torch.dtype) -> None:
    """Long and short dtype names resolve regardless of device."""
    assert resolve_dtype(name, "cpu") is expected


def test_invalid_dtype() -> None:
    """Unknown dtype names raise ValueError listing what is accepted."""
    with pytest.raises(ValueError, match="fp16"):
        resolve_dtype("int8", "cpu")
