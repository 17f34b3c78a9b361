"""The wall around the SQL: only store modules import the database driver, and the metrics are
a pure sink. Read from the source with ``ast``, so an import inside a function or under
``TYPE_CHECKING`` counts as well."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import outbox_notifier

PACKAGE = Path(outbox_notifier.__file__).parent

#: The modules that talk to the database for the pipeline (dbhealth: its DeadlineExceeded is a
#: driver OperationalError, so that one ``except`` covers a lost and an abandoned call).
STORE_MODULES = {"store", "maintenance_store", "connections", "dbhealth"}
#: Pipeline modules: they reach the database only through the store modules.
PIPELINE_MODULES = {
    "relay",
    "delivery",
    "completer",
    "metrics",
    "retention",
    "leadership",
    "daemon",
    "http",
    "backoff",
    "names",
    "reports",
    "loops",
    "rescue",
    "maintenance",
    "listener",
}
DRIVER = {"psycopg", "psycopg_pool"}


def imported(module: str) -> set[str]:
    return imported_by((PACKAGE / f"{module}.py").read_text())


def imported_by(source: str) -> set[str]:
    """Every module name the source imports (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``, so a module imported by its parent package's name counts too)."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def roots(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_the_listed_modules_exist() -> None:
    for module in STORE_MODULES | PIPELINE_MODULES:
        assert (PACKAGE / f"{module}.py").is_file(), module


def test_only_store_modules_import_the_driver() -> None:
    offenders = {m: sorted(roots(imported(m)) & DRIVER) for m in sorted(PIPELINE_MODULES)}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_store_modules_do_import_the_driver() -> None:
    # the check above would pass vacuously if the driver were reached some other way
    for module in STORE_MODULES:
        assert roots(imported(module)) & DRIVER, module


def test_metrics_is_a_pure_sink() -> None:
    names = imported("metrics")
    assert not roots(names) & DRIVER
    assert "outbox_notifier.relay" not in names
    assert not any(n.startswith("outbox_notifier.sqlfiles") for n in names)


def test_a_nested_type_checking_import_is_found() -> None:
    source = (
        "if TYPE_CHECKING:\n    def f():\n        from psycopg_pool import AsyncConnectionPool\n"
    )
    assert roots(imported_by(source)) == {"psycopg_pool"}
    assert "outbox_notifier.relay" in imported_by("from outbox_notifier import relay\n")


def loaded_by(modules: Iterable[str]) -> set[str]:
    """Every module a fresh interpreter holds after importing ``modules``: what they reach
    through other modules counts too (a relative import as well)."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n    importlib.import_module(name)\n"
        "print('\\n'.join(sys.modules))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code, *modules], capture_output=True, text=True, check=True
    )
    return set(ran.stdout.split())


def within(names: Iterable[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_the_providers_do_not_import_the_store() -> None:
    # A provider turns a delivery into a result; what the database makes of it is the
    # delivery loop's business (the claim policy is built in the composition root).
    paths = sorted((PACKAGE / "providers").glob("*.py"))
    for path in paths:
        assert not within(imported_by(path.read_text()), "outbox_notifier.store"), path.name
    modules = [f"outbox_notifier.providers.{p.stem}" for p in paths if p.stem != "__init__"]
    assert not within(loaded_by(["outbox_notifier.providers", *modules]), "outbox_notifier.store")


def test_metrics_import_neither_the_providers_nor_httpx() -> None:
    # The metrics are a sink: they know provider names (outbox_notifier.names), not providers.
    names = imported("metrics")
    assert not within(names, "outbox_notifier.providers")
    assert "httpx" not in roots(names)
    loaded = loaded_by(["outbox_notifier.metrics"])
    assert not within(loaded, "outbox_notifier.providers")
    assert "httpx" not in roots(loaded)
