"""What code reads of an object is declared on its type: the flags the training step reads on a term,
the executor's members the schedule calls, a run directory's process record."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from ted_fl.continual import combined, gkd, step, terms
from ted_fl.federated.server_app import FlowerExecutor
from ted_fl.run.directory import RunDir
from ted_fl.schedule import engine
from ted_fl.schedule.in_process import LocalExecutor


def _read_on(module_path: Path, owner: str) -> set[str]:
    """Attribute names read as `<anything>.<owner>.<name>` in a module (e.g. `wt.term.needs_probes`)."""
    tree = ast.parse(module_path.read_text())
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == owner}


def test_the_step_reads_only_flags_that_term_declares() -> None:
    read = _read_on(Path(step.__file__), "term")
    assert read, "the scan found no term flag: the step's code changed shape, update this test"
    assert read <= set(dir(terms.Term)), f"flags the step reads that Term does not declare: {read - set(dir(terms.Term))}"


def test_no_term_adds_a_flag_of_its_own() -> None:
    """Every boolean class attribute of a term is one of Term's flags (a new flag goes on Term, with its default)."""
    flags = {k for k, v in vars(terms.Term).items() if isinstance(v, bool)}
    for module in (terms, gkd, combined):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, terms.Term):
                own = {k for k, v in vars(cls).items() if isinstance(v, bool)}
                assert own <= flags, f"{cls.__name__} sets undeclared flags {own - flags}"


def test_every_executor_implements_the_protocol() -> None:
    members = {k for k, v in vars(engine.Executor).items() if callable(v) and not k.startswith("_")}
    assert "aggregate" in members  # the schedule calls it on every executor (no getattr fallback)
    for cls in (LocalExecutor, FlowerExecutor):
        assert members <= set(dir(cls)), f"{cls.__name__} lacks {members - set(dir(cls))}"
    assert "getattr(executor" not in Path(engine.__file__).read_text()


def test_a_run_directory_declares_its_process_record(tmp_path: Path) -> None:
    assert RunDir(tmp_path).record is None
