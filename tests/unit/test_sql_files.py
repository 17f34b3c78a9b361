"""Each part of the daemon reads its statements from its own file of sql/: a reviewer finds all
the SQL of the maintenance loop in maintenance.sql, all of the pipeline's in queries.sql."""

from __future__ import annotations

import ast
from pathlib import Path

import outbox_notifier
from outbox_notifier import sqlfiles

PACKAGE = Path(outbox_notifier.__file__).parent

#: Which file of sql/ holds the statements each module runs.
FILE_OF_MODULE = {
    "store": "queries.sql",
    "timeouts": "queries.sql",
    "connections": "queries.sql",
    "migrations": "queries.sql",
    "maintenance_store": "maintenance.sql",
    "operator": "operator.sql",
    "pauses": "operator.sql",
}


def names_in(file: str) -> set[str]:
    return set(sqlfiles._QUERY_HEADER.findall((sqlfiles.SQL_DIR / file).read_text()))


def queries_named_by(module: str) -> set[str]:
    """The string constants of the module's source that name a query (``query("x")``, or a
    name kept in a table as the purges' are)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    constants = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    return constants & set(sqlfiles.queries())


def test_each_module_runs_the_statements_of_its_own_file() -> None:
    for module, file in FILE_OF_MODULE.items():
        named = queries_named_by(module)
        assert named, module
        assert named <= names_in(file), (module, sorted(named - names_in(file)))


def test_the_maintenance_statements_are_all_in_maintenance_sql() -> None:
    assert names_in("maintenance.sql") == {
        "purge_outbox_batch",
        "purge_records_batch",
        "acquire_lease",
        "renew_lease",
        "release_lease",
        "metrics_snapshot",
        "end_pauses",
        "xmin_horizon",
        "table_tuples",
        "analyze_fresh_tables",
    }
    assert queries_named_by("maintenance_store") == names_in("maintenance.sql")
