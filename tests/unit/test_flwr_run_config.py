"""The `flwr run --run-config` strings the docs show pass Flower's own parser and ted-fl's schema.

Flower's CLI parses `--run-config` before anything of ted-fl runs (an unparsable string is exit 1
and a SuperLink left running), so each documented string goes through Flower's parser
(`flwr.common.config.parse_config_args`, what `flwr run` calls) and then `from_run_config`."""

from __future__ import annotations

import re
import shlex

import pytest
from flwr.common.config import parse_config_args

from ted_fl.config import from_run_config
from tests.conftest import REPO

DOCUMENTED = re.compile(r"--run-config '([^']*)'")


def documented_run_configs() -> list[str]:
    found = []
    for name in ("docs/deployment.md", "pyproject.toml"):
        found += DOCUMENTED.findall((REPO / name).read_text())
    return found


def test_every_documented_run_config_parses() -> None:
    configs = documented_run_configs()
    assert any("set=" in c for c in configs)  # the docs show `set`, the form that broke
    for text in configs:
        run_config = parse_config_args([text])  # raises for a form Flower refuses
        run_config.pop("keep_superlink", None)
        from_run_config(run_config)


@pytest.mark.parametrize("inner", ["federated.probes=seed", "federated.probes='seed'"])
def test_set_takes_bare_and_single_quoted_strings(inner: str) -> None:
    # As a shell passes it: the command line's single quotes removed.
    [text] = shlex.split(f"""'approaches="seq ted_gugf" set="train.rounds=2 {inner}"'""")
    cfg = from_run_config(parse_config_args([text]))
    assert cfg.approaches == ["seq", "ted_gugf"]
    assert cfg.train.rounds == 2 and cfg.federated.probes == "seed"
