"""The floor plan's rules (docs/ARCHITECTURE.md), checked on the source itself.

- The library (farm/ outside farm/cli/) never imports workers/, models/, benchmarks/, torch, diffusers or the
  command line; farm/cli/ is the only part of farm/ that reaches workers/ and models/, and only inside command
  functions.
- models/ imports nothing of ours; workers/ never imports the command line or the benchmarks.
- The wings (farm's sub-packages and top-level modules, workers, models, benchmarks) import each other without
  a cycle.
- `import farm.cli`, `farm submit` and `farm status` load no torch; `farm status` loads none of the other heavy
  libraries either (Celery, kombu, boto3, pyarrow, PIL, alembic, rich, numpy): only click and SQLAlchemy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("farm", "workers", "models", "benchmarks")
HEAVY = ("torch", "diffusers", "transformers", "bitsandbytes")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. farm.cli.worker
    target: str  # what it imports, e.g. workers.main
    top_level: bool  # at module level (not inside a function)
    type_only: bool  # under `if TYPE_CHECKING:`


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: str) -> list[Import]:
    found: list[Import] = []
    for path in sorted((REPO / package).rglob("*.py")):
        module = _module_name(path)

        def visit(node: ast.AST, in_function: bool, type_only: bool, module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    visit(child, True, type_only)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    visit(child, in_function, True)
                elif isinstance(child, ast.Import):
                    found.extend(Import(module, a.name, not in_function, type_only) for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    targets = [child.module, *(f"{child.module}.{a.name}" for a in child.names)]
                    found.extend(Import(module, t, not in_function, type_only) for t in targets)
                else:
                    visit(child, in_function, type_only)

        visit(ast.parse(path.read_text(encoding="utf-8")), False, False)
    return found


def _root(name: str) -> str:
    return name.split(".")[0]


def _is_cli(module: str) -> bool:
    return module == "farm.__main__" or module == "farm.cli" or module.startswith("farm.cli.")


def test_the_library_never_imports_workers_models_torch_or_the_command_line() -> None:
    banned = {"workers", "models", "benchmarks", *HEAVY}
    offenders = sorted(
        f"{i.module} imports {i.target}"
        for i in _imports("farm")
        if not _is_cli(i.module) and (_root(i.target) in banned or _is_cli(i.target))
    )
    assert offenders == []


def test_the_command_line_reaches_workers_and_models_only_inside_command_functions() -> None:
    heavy = {"workers", "models", "benchmarks", *HEAVY}
    cli_imports = [i for i in _imports("farm") if _is_cli(i.module)]
    assert any(_root(i.target) == "workers" for i in cli_imports)  # the rule has something to check
    offenders = sorted(
        f"{i.module} imports {i.target}" for i in cli_imports if i.top_level and _root(i.target) in heavy
    )
    assert offenders == []


def test_models_import_nothing_of_ours_nor_queues_databases_or_storage() -> None:
    banned = {"farm", "workers", "benchmarks", "celery", "kombu", "sqlalchemy", "boto3", "botocore", "redis"}
    offenders = sorted(f"{i.module} imports {i.target}" for i in _imports("models") if _root(i.target) in banned)
    assert offenders == []


def test_workers_never_import_the_command_line_or_the_benchmarks() -> None:
    offenders = sorted(
        f"{i.module} imports {i.target}"
        for i in _imports("workers")
        if _is_cli(i.target) or _root(i.target) == "benchmarks"
    )
    assert offenders == []


def _wing(name: str) -> str:
    """farm.store.transitions → farm.store; farm.settings → farm.settings; workers.tasks → workers."""
    parts = name.split(".")
    if parts[0] != "farm" or len(parts) == 1:
        return parts[0]
    return f"farm.{parts[1]}"


def _wing_graph() -> dict[str, set[str]]:
    known = {_wing(_module_name(p)) for package in OURS for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for package in OURS:
        for i in _imports(package):
            source, target = _wing(i.module), _wing(i.target)
            if i.type_only or source == target or target not in known or source == "farm":
                continue  # farm/__init__.py only loads farm.client lazily, for `from farm import Client`
            graph.setdefault(source, set()).add(target)
    return graph


def test_the_wings_import_each_other_without_a_cycle() -> None:
    graph = _wing_graph()
    assert {"farm.cli", "farm.store", "farm.submit", "farm.dispatch", "farm.storage", "farm.outputs"} <= set(graph)
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError(f"import cycle between wings: {' → '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_import_cli_submit_and_status_load_no_torch(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse\n")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import farm.cli\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'workers', 'models', 'benchmarks')\n"
        "loaded = [sorted(m for m in heavy if m in sys.modules)]\n"
        "home = sys.argv[1]\n"
        "for args in (['submit', sys.argv[2], '--dataset', 'layout', '--no-dispatch'], ['status']):\n"
        "    r = CliRunner().invoke(farm.cli.main, ['--home', home, *args])\n"
        "    assert r.exit_code == 0, r.output\n"
        "    loaded.append(sorted(m for m in heavy if m in sys.modules))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "home"), str(prompts)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert result.stdout.strip() == "[[], [], []]"


# What `farm status` used to load and no longer does: every `farm` command module and its libraries came with it.
STATUS_NEVER_LOADS = ("celery", "kombu", "boto3", "botocore", "pyarrow", "PIL", "alembic", "rich", "numpy", "redis")


def test_status_loads_none_of_the_heavy_libraries(tmp_path: Path) -> None:
    """`farm status` (and `--json`) imports its own command module and the job store's queries, nothing else."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    home = tmp_path / "home"
    code = (
        "import sys\n"
        "from farm.cli import main\n"
        "try:\n"
        "    main(['--home', sys.argv[1], *sys.argv[2:]])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        f"heavy = {STATUS_NEVER_LOADS!r}\n"
        "print(sorted(m for m in heavy if m in sys.modules), "
        "sorted(m for m in sys.modules if m.startswith('farm.cli.')))\n"
    )
    run = [sys.executable, "-c", code, str(home)]
    subprocess.run([*run, "submit", str(prompts), "--dataset", "d"], check=True, capture_output=True, cwd=REPO)
    for args in (["status"], ["status", "--json"], ["status", "d"]):
        result = subprocess.run([*run, *args], capture_output=True, text=True, check=True, cwd=REPO)
        assert result.stdout.strip().splitlines()[-1] == "[] ['farm.cli.common', 'farm.cli.status']", args
