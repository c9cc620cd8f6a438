"""The schema revisions this code ships, read from the migration scripts' text (no alembic, no SQLAlchemy: every
command checks the database's revision against them, `farm status` among them)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

# `revision = "0011"` / `down_revision = "0010"` (or None) at the top level of a migration script.
_REVISION_LINE = re.compile(r"""^(revision|down_revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)\s*$""", re.M)


@functools.cache
def _shipped() -> dict[str, str | None]:
    """Every revision this code ships → the one it revises, read from the scripts' text (alembic would import
    each script). The layout is checked against alembic's own reading by tests/test_db.py."""
    import migrations

    found: dict[str, str | None] = {}
    for script in sorted((Path(migrations.__file__).parent / "versions").glob("*.py")):
        values = {m.group(1): m.group(2) for m in _REVISION_LINE.finditer(script.read_text(encoding="utf-8"))}
        if values.get("revision"):
            found[values["revision"]] = values.get("down_revision")
    return found


def head_revision() -> str:
    """The newest revision this code ships."""
    shipped = _shipped()
    heads = set(shipped) - {down for down in shipped.values() if down}
    if len(heads) == 1:
        return heads.pop()
    from alembic.script import ScriptDirectory  # not one line of history: alembic decides (or says why not)

    import migrations

    head = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    """Every revision this code ships."""
    return set(_shipped())
