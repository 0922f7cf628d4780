"""Sites of different image sizes (data.size = 0 and per-site `preprocess.size`, as
sites/retina.toml keeps each camera's scale): every approach, joint included, runs end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ted_fl.config import dump_toml, to_dict
from tests.conftest import REPO, tiny_config

SIZES = {"RUNMC": 32, "BMC": 48, "I2CVB": 40}


def test_per_site_sizes_run_seq_ted_gugf_and_joint(tmp_path: Path) -> None:
    from ted_fl.commands.shared import run_command
    from ted_fl.data import load_sites

    text = (REPO / "sites" / "prostate.toml").read_text()
    for site, size in SIZES.items():
        text, n = re.subn(rf'(\[\[sites\]\]\nname = "{site}"\n)', rf"\1preprocess = {{ size = {size} }}\n", text)
        assert n == 1, site
    sites = tmp_path / "prostate_sizes.toml"
    sites.write_text(text)
    cfg = tiny_config(tmp_path, ["seq", "ted_gugf", "joint"])
    cfg.data.sites, cfg.data.size = str(sites), 0
    cfg.train.joint_rounds_factor = 1.0
    loaded = load_sites(cfg.data, seed=0)
    assert {s.name: s.train.images.shape[-1] for s in loaded} == SIZES
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    assert run_command("centralized", ["--config", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 0
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    summary = pd.read_csv(run / "summary.csv").set_index("approach")
    assert list(summary.index) == ["seq", "ted_gugf", "joint"]
    assert np.isfinite(summary["avg"].to_numpy()).all()
    m = pd.read_csv(run / "metrics.csv")
    joint = m[(m["approach"] == "joint") & (m["split"] == "test") & (m["metric"] == "dice")]
    assert set(joint["site"]) == set(SIZES)  # every site scored at its own size
