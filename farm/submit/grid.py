"""Grids: `--vary AXIS=VALUES` options, each prompt row expanded to the cartesian product of all axes.

Axes: seed and steps take comma lists and inclusive integer ranges (`0..7`), size takes `WxH` comma lists,
guidance_scale and conditioning_scale take comma lists of numbers. Every value is checked with the same
validator as a row's fields, and an error names the --vary option and the value.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from farm.errors import InvalidSubmission
from farm.submit.fields import FieldProblem, check_value

# Axis → the job fields one of its values sets.
AXES: dict[str, tuple[str, ...]] = {
    "seed": ("seed",),
    "size": ("width", "height"),
    "steps": ("num_inference_steps",),
    "guidance_scale": ("guidance_scale",),
    "conditioning_scale": ("conditioning_scale",),
}
_ALIASES = {"num_inference_steps": "steps", "guidance": "guidance_scale"}
_INTEGER_AXES = ("seed", "steps")
MAX_AXIS_VALUES = 100_000  # a typo such as seed=0..10000000000 fails here, not after minutes of planning
MAX_VARIATIONS = 1_000_000
_RANGE = re.compile(r"^\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*$")
_SIZE = re.compile(r"^\s*(\S+?)\s*[xX×]\s*(\S+)\s*$")


@dataclass(frozen=True)
class Axis:
    """One --vary option: its axis and, for each of its values, the job fields that value sets."""

    name: str
    text: str  # as given, for messages
    values: tuple[dict[str, Any], ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return AXES[self.name]


def parse_axis(text: str) -> Axis:
    """Parse and validate one `AXIS=VALUES` option."""
    name, sep, spec = text.partition("=")
    name = name.strip().lower().replace("-", "_")
    name = _ALIASES.get(name, name)
    if not sep:
        raise _error(text, "expected AXIS=VALUES, for example seed=0..7 or size=1024x1024,768x1344", text)
    if name not in AXES:
        raise _error(text, f"unknown axis {name!r} (axes: {', '.join(AXES)})", text)
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or any(not item for item in items):
        raise _error(text, "empty value in the list", spec)
    values: list[dict[str, Any]] = []
    for item in items:
        values.extend(_values(name, text, item))
        if len(values) > MAX_AXIS_VALUES:
            raise _error(text, f"more than {MAX_AXIS_VALUES} values", spec)
    return Axis(name, text, tuple(values))


def parse_grid(texts: Iterable[str]) -> tuple[Axis, ...]:
    """Every --vary option; an axis given twice is an error (list its values in one option)."""
    axes: list[Axis] = []
    for text in texts:
        axis = parse_axis(text)
        if any(a.name == axis.name for a in axes):
            raise _error(text, f"axis {axis.name!r} is given twice; list all its values in one --vary", text)
        axes.append(axis)
    total = 1
    for axis in axes:
        total *= len(axis.values)
    if total > MAX_VARIATIONS:
        error = InvalidSubmission(f"--vary gives {total} variations of each prompt, more than {MAX_VARIATIONS}")
        error.field = "vary"
        raise error
    return tuple(axes)


def variations(axes: tuple[Axis, ...]) -> list[dict[str, Any]]:
    """The cartesian product: one dict of job fields per variation; one empty dict without axes."""
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*(a.values for a in axes))]


def _values(name: str, text: str, item: str) -> list[dict[str, Any]]:
    if name == "size":
        match = _SIZE.fullmatch(item)
        if match is None:
            raise _error(text, "a size is WIDTHxHEIGHT, for example 1024x1024", item)
        return [{"width": _checked(text, "width", match[1], item), "height": _checked(text, "height", match[2], item)}]
    (field,) = AXES[name]
    ranged = _RANGE.fullmatch(item)
    if ranged is None:
        if ".." in item:
            what = "integer ranges a..b" if name in _INTEGER_AXES else "comma lists (no ranges)"
            raise _error(text, f"{name} takes {what}", item)
        return [{field: _checked(text, field, item, item)}]
    if name not in _INTEGER_AXES:
        raise _error(text, f"{name} takes comma lists, not ranges", item)
    low, high = int(ranged[1]), int(ranged[2])
    if low > high:
        raise _error(text, f"empty range: {low} is above {high}", item)
    if high - low + 1 > MAX_AXIS_VALUES:
        raise _error(text, f"more than {MAX_AXIS_VALUES} values", item)
    # Both ends checked: the limits are intervals, so every value between is valid too.
    _checked(text, field, low, item)
    _checked(text, field, high, item)
    return [{field: value} for value in range(low, high + 1)]


def _checked(text: str, field: str, value: Any, item: str) -> Any:
    try:
        return check_value(field, value)
    except FieldProblem as exc:
        raise _error(text, str(exc), item) from None


def _error(text: str, message: str, value: Any) -> InvalidSubmission:
    error = InvalidSubmission(f"--vary {text}: {message}", value=value)
    error.field = "vary"  # set after: the message names the option itself, not "field 'vary'"
    return error
