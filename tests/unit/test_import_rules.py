"""The wall around the SQL: no module of the package imports the database driver unless it is
named below with its reason, and the metrics are a pure sink. Deny by default: every module is
read, so a new one cannot slip past. Read from the source with ``ast``, so an import inside a
function or under ``TYPE_CHECKING`` counts as well."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import outbox_notifier

PACKAGE = Path(outbox_notifier.__file__).parent

DRIVER = {"psycopg", "psycopg_pool"}

#: The only modules that may import the driver, each with its reason.
DRIVER_ALLOWED = {
    # The store modules: the only ones that run the daemon's SQL.
    "store": "the pipeline's statements (sql/queries.sql)",
    "maintenance_store": "the maintenance loop's statements (sql/maintenance.sql)",
    "connections": "the pool, the start-up probe and the outbox listener",
    "timeouts": "the statement and lock timeouts every store's statements run under",
    "migrations": "applies sql/ migrations and checks the schema version",
    # Not stores, each for one reason.
    "dbhealth": "its DeadlineExceeded is a driver OperationalError: one except for both",
    "settings": "checks and masks the DSN with the driver's conninfo parser",
    "cli": "turns a refused connection into one line and exit code 1",
    # Commands with a connection of their own, not yet through a store.
    "operator": "status, requeue and replay: one short synchronous connection",
    "pauses": "pause and resume: the operator's connection, its refusals told apart",
    "demo": "seeds the demo's database and watches it",
    # Test support shipped in the package, never imported by the daemon.
    "testing.postgres": "creates and drops the tests' databases",
}


def modules() -> list[str]:
    """Every module of the package, dotted from the package (``providers.base``)."""
    return sorted(
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts) for path in PACKAGE.rglob("*.py")
    )


def imported(module: str) -> set[str]:
    return imported_by((PACKAGE / f"{module.replace('.', '/')}.py").read_text())


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


def test_only_the_allowed_modules_import_the_driver() -> None:
    found = {m: sorted(roots(imported(m)) & DRIVER) for m in modules()}
    assert {m: d for m, d in found.items() if d and m not in DRIVER_ALLOWED} == {}


def test_every_allowed_module_exists_and_imports_the_driver() -> None:
    # an entry that no longer needs the driver (or names nothing) must leave the list
    found = set(modules())
    for module in DRIVER_ALLOWED:
        assert module in found, module
        assert roots(imported(module)) & DRIVER, module


def test_the_walk_sees_the_whole_package() -> None:
    # the rule would pass vacuously over a walk that found nothing, or not the subpackages
    found = set(modules())
    assert {"store", "relay", "delivery", "__main__", "testing.postgres"} <= found
    assert any(m.startswith("providers.") for m in found)


def test_metrics_is_a_pure_sink() -> None:
    names = imported("metrics")
    assert not roots(names) & DRIVER
    assert "outbox_notifier.relay" not in names
    assert not any(n.startswith("outbox_notifier.sqlfiles") for n in names)


def test_a_submodule_import_counts_as_the_driver() -> None:
    assert roots(imported_by("import psycopg.errors\n")) == {"psycopg"}
    assert roots(imported_by("from psycopg_pool.pool import X\n")) == {"psycopg_pool"}


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
