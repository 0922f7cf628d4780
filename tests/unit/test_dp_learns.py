"""simulations/dp-learns.toml: the configuration of the privacy-utility curves of docs/results-privacy.md
(sections dp-learns-sample and dp-learns-client) loads and expands into valid study cells at both DP levels.

Cheap: no data, no training; what it guards is that the shipped file still parses, still has what DP
needs to learn (large batches, a small group-norm network) and that neither study command is refused.
"""

from __future__ import annotations

import math

import pytest

from ted_fl.config import load_experiment, project_root, set_key
from ted_fl.studies.privacy_utility import privacy_cells

PATH = project_root() / "simulations" / "dp-learns.toml"


def test_dp_learns_has_what_dp_needs_to_learn() -> None:
    cfg = load_experiment(PATH)
    assert cfg.model.norm == "group"  # Opacus needs no batch statistics; the same net at epsilon = inf
    assert cfg.model.channels == [8, 16, 32, 64]
    assert cfg.train.batch_size >= 64  # DP noise on a batch mean shrinks as 1 / batch
    assert cfg.data.synthetic_volumes >= 40
    assert cfg.seeds == [0, 1, 2]


@pytest.mark.parametrize("dp", ["sample", "client"])
def test_dp_learns_expands_into_valid_cells(dp: str) -> None:
    cfg = load_experiment(PATH)
    if dp == "client":  # the client-level study's overrides (docs/results-privacy.md gives the command)
        set_key(cfg, "federated.clients_per_site", 16)
    cells = privacy_cells(cfg, [1.0, 8.0, math.inf], dp)
    assert len(cells) == 3 * len(cfg.seeds) * len(cfg.approaches)
    assert {c.cfg.privacy.dp for c in cells} == {dp, "off"}
    assert len({c.key for c in cells}) == len(cells)  # every cell its own identity
