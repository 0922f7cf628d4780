"""machine.json never needs a package's installed metadata (issue 22: `centralized` died in
`run.machine_info` with PackageNotFoundError for ray where Ray had no dist-info)."""

from __future__ import annotations

import importlib.metadata

import pytest

from ted_fl.schedule.lifecycle import machine_info, package_version


def test_versions_fall_back_to_the_module_then_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr
    import ray

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    info = machine_info()
    assert info["ray"] == ray.__version__ and info["flwr"] == flwr.__version__
    assert package_version("ted_fl_no_such_package") == "unknown"


def test_versions_come_from_the_metadata_when_it_is_there() -> None:
    assert machine_info()["ray"] == importlib.metadata.version("ray")
