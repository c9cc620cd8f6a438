"""Acceptance rules of a yield-targeted line: how many accepted images it wants, in how many tries, and the bar.

A row has rules when it (or an option) sets any of these fields; its `accept` N replaces images_per_prompt, so
tries 0 .. N-1 are the jobs `images_per_prompt` N would make. The rules are stored with the line at its first
submit (acceptance_lines) and decided by farm/store/verdicts.py.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from farm.rules import Rules
from farm.submit.fields import FieldProblem, field_error
from farm.submit.inputs import Row

# The per-row fields (and `farm submit` options) that make a line yield-targeted.
RULE_FIELDS = ("accept", "max_tries", "min_clip_score", "min_aesthetic", "safety", "dedup")
SAFETY_CHOICES = ("drop", "flag")
ACCEPT_RANGE = (1, 10_000)
MAX_TRIES_LIMIT = 100_000
DEFAULT_TRIES_PER_ACCEPT = 4  # max_tries when not given: 4 tries per wanted image


def check_rule(field: str, value: Any) -> Any:
    """The converted value of one rule field, or FieldProblem."""
    if value is None:
        return None
    if field == "safety":
        if value not in SAFETY_CHOICES:
            raise FieldProblem(f"safety must be one of {', '.join(SAFETY_CHOICES)}", value)
        return str(value)
    if field in ("accept", "max_tries"):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not (whole or (isinstance(value, str) and value.strip().isdigit())):
            raise FieldProblem(f"{field} must be an integer", value)
        count = int(value)
        low, high = ACCEPT_RANGE if field == "accept" else (1, MAX_TRIES_LIMIT)
        if not low <= count <= high:
            raise FieldProblem(f"{field} must be between {low} and {high}", value)
        return count
    if isinstance(value, bool):
        raise FieldProblem(f"{field} must be a number", value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FieldProblem(f"{field} must be a number", value) from None
    bottom, top = {"min_clip_score": (0.0, 100.0), "min_aesthetic": (0.0, 10.0), "dedup": (0.0, 1.0)}[field]
    if not bottom <= number <= top or number != number or (field == "dedup" and number == 0.0):
        bounds = f"in (0, {top:g}]" if field == "dedup" else f"between {bottom:g} and {top:g}"
        raise FieldProblem(f"{field} must be {bounds}", value)
    return number


def row_rules(
    row: Row, option_values: dict[str, Any], images_per_prompt: Any, *, keep_rejected: bool, scorer: str
) -> Rules | None:
    """The rules of one row (its own fields over the options'), or None when neither sets any."""
    if not option_values and row.fields.keys().isdisjoint(RULE_FIELDS):
        return None  # the common row: no rules here nor in the options (a set test, once per row)
    given = {name: row.fields[name] for name in RULE_FIELDS if row.fields.get(name) is not None}
    values = {name: v for name, v in option_values.items() if v is not None}
    if not given and not values:
        return None

    def checked(name: str) -> Any:
        if name in given:
            return _checked(row, name, given[name], option=False)
        return _checked(row, name, values.get(name), option=True)

    accept = checked("accept")
    if accept is None:
        accept = images_per_prompt
    elif images_per_prompt != 1 and images_per_prompt != accept:
        raise field_error(
            row, "images_per_prompt", images_per_prompt, f"a line with accept {accept} makes its first {accept} tries"
        )
    max_tries = checked("max_tries")
    if max_tries is None:
        max_tries = min(accept * DEFAULT_TRIES_PER_ACCEPT, MAX_TRIES_LIMIT)
    elif max_tries < accept:
        from_option = "max_tries" not in given and "accept" not in given
        raise field_error(row, "max_tries", max_tries, f"max_tries must be at least accept ({accept})", from_option)
    rules = Rules(
        accept=accept,
        max_tries=max_tries,
        min_clip_score=checked("min_clip_score"),
        min_aesthetic=checked("min_aesthetic"),
        safety=checked("safety"),
        dedup=checked("dedup"),
        keep_rejected=keep_rejected,
    )
    return Rules(**{**asdict(rules), "scorer": scorer}) if rules.needs_scores else rules


def _checked(row: Row, name: str, value: Any, option: bool) -> Any:
    try:
        return check_rule(name, value)
    except FieldProblem as exc:
        raise field_error(row, name, exc.shown, exc.message, option) from None
