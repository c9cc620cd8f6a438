"""Per-image fields: their limits and the one validator that converts and range-checks them at submit."""

from __future__ import annotations

import re
from typing import Any

from farm.errors import InvalidSubmission
from farm.submit.inputs import Row

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000

# Limits (inclusive). Sizes must be multiples of 16: the VAE downsamples by 8 and the transformer's patches are 2.
SIZE_RANGE = (64, 4096)
SIZE_MULTIPLE = 16
STEPS_RANGE = (1, 200)  # the outer bound; each sampler has its own (farm/profiles.py: LCM takes at most 50)
GUIDANCE_RANGE = (0.0, 30.0)
IMAGES_PER_PROMPT_RANGE = (1, 10_000)
CONDITIONING_SCALE_RANGE = (0.0, 2.0)

OPTIONS = Row("(options)", 0, {})  # where option values "come from": errors about them name no file or line


def field_error(row: Row, field: str, value: Any, message: str, option: bool = False) -> InvalidSubmission:
    """An InvalidSubmission naming the value, and the file and line unless it is an option."""
    if option:
        return InvalidSubmission(f"{message}, got {value!r}", field=field, value=value)
    return InvalidSubmission(f"{message}, got {value!r}", path=row.path, line=row.line, field=field, value=value)


class FieldProblem(ValueError):
    """A value a field cannot take: the message without the place, and the value as shown."""

    def __init__(self, message: str, shown: Any) -> None:
        super().__init__(f"{message}, got {shown!r}")
        self.message, self.shown = message, shown


def check_field(row: Row, field: str, value: Any, option: bool = False) -> Any:
    """Convert and range-check one field; the error names file, line, field and value."""
    try:
        return check_value(field, value)
    except FieldProblem as exc:
        raise field_error(row, field, exc.shown, exc.message, option) from None


def check_value(field: str, value: Any) -> Any:
    """The converted value, or FieldProblem saying why it cannot be used."""
    if field == "negative_prompt":
        if value is None:
            return None
        if not isinstance(value, str):
            raise FieldProblem("negative_prompt must be text", value)
        if len(value) > MAX_PROMPT_CHARS:
            raise FieldProblem(f"negative_prompt longer than {MAX_PROMPT_CHARS} characters", f"{value[:40]}…")
        return value.strip() or None
    if field == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise FieldProblem("missing or empty prompt", value)
        if len(value) > MAX_PROMPT_CHARS:
            raise FieldProblem(f"prompt longer than {MAX_PROMPT_CHARS} characters", f"{value[:40]}…")
        return value.strip()
    if field in ("guidance_scale", "conditioning_scale"):
        number = _number(field, value, float)
        low, high = GUIDANCE_RANGE if field == "guidance_scale" else CONDITIONING_SCALE_RANGE
        if not low <= number <= high:
            raise FieldProblem(f"{field} must be between {low} and {high}", value)
        return number
    number = _number(field, value, int)
    if field in ("width", "height"):
        low, high = SIZE_RANGE
        if not low <= number <= high:
            raise FieldProblem(f"{field} must be between {low} and {high}", value)
        if number % SIZE_MULTIPLE:
            raise FieldProblem(f"{field} must be a multiple of {SIZE_MULTIPLE}", value)
    elif field == "num_inference_steps":
        low, high = STEPS_RANGE
        if not low <= number <= high:
            raise FieldProblem(f"num_inference_steps must be between {low} and {high}", value)
    elif field == "images_per_prompt":
        low, high = IMAGES_PER_PROMPT_RANGE
        if not low <= number <= high:
            raise FieldProblem(f"images_per_prompt must be between {low} and {high}", value)
    elif field == "seed" and not 0 <= number <= MAX_SEED:
        raise FieldProblem(f"seed must be between 0 and {MAX_SEED}", value)
    return number


def _number(field: str, value: Any, kind: type) -> Any:
    if isinstance(value, bool):
        raise FieldProblem(f"{field} must be a number", value)
    if kind is int:
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise FieldProblem(f"{field} must be an integer", value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldProblem(f"{field} must be a number", value) from None
    if number != number:  # NaN
        raise FieldProblem(f"{field} must be a number", value)
    return number
