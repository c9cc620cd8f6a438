"""The import rules of DESIGN.md: farm never imports workers, torch or diffusers; models knows no queues."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _top_level_imports(package: str) -> dict[str, set[str]]:
    """Module → top-level packages it imports at module level (not inside functions)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_farm_modules_never_import_workers_models_torch_or_diffusers_at_module_level() -> None:
    heavy = {"workers", "models", "torch", "diffusers", "transformers"}
    offenders = {m: names & heavy for m, names in _top_level_imports("farm").items() if names & heavy}
    assert offenders == {}


def test_models_know_nothing_of_queues_databases_or_storage() -> None:
    banned = {"celery", "kombu", "sqlalchemy", "boto3", "botocore", "farm", "workers", "redis"}
    offenders = {m: names & banned for m, names in _top_level_imports("models").items() if names & banned}
    assert offenders == {}


def test_farm_submit_and_status_start_without_loading_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from farm.cli import main\n"
        f"r = CliRunner().invoke(main, ['--home', {str(tmp_path)!r}, 'status'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'workers', 'models') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
