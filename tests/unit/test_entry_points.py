"""Entry points answer before the heavy imports, keep what the policy says, print words for what
cannot be computed, and count faults per site (no Ray, no Flower run)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, tiny_config

HEAVY = ("torch", "flwr", "ray", "monai", "pandas")

PROBE = r"""
import contextlib, io, json, sys
out = {}
def call(name, main, argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    out[name] = [code, err.getvalue().strip().splitlines()[-1:] ]
from ted_fl.simulate import main as sim
from ted_fl.centralized import main as cen
from ted_fl.sites import main as sites
call("simulate --help", sim, ["--help"])
call("centralized --help", cen, ["--help"])
call("sites --help", sites, ["--help"])
call("bad --set", sim, ["--set", "train.rounds.x=1"])
call("bad value", sim, ["--set", "train.rounds=0"])
call("bad approach", cen, ["--approach", "sq"])
call("bad config", sim, ["--config", "nope"])
call("data-dir is a file", sim, ["--data-dir", sys.argv[1]])
call("resume finished", sim, ["--resume", sys.argv[2]])
call("privacy secagg", sim, ["--set", "privacy.secagg=true"])
call("privacy ewc", cen, ["--approach", "ewc", "--set", 'privacy.dp="sample"'])
call("nan lambda_d", sim, ["--set", "loss.lambda_d=nan", "--check"])
call("out under a file", sim, ["--out", sys.argv[1] + "/runs", "--check"])
call("out in /proc", cen, ["--out", "/proc/ted-fl-x/runs", "--check"])
from ted_fl.bench import main as bench
from ted_fl.generalize import main as gen
from ted_fl.sweep import main as sweep
call("bench --help", bench, ["--help"])
call("generalize --help", gen, ["--help"])
call("sweep --help", sweep, ["--help"])
out["heavy"] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps(out))
"""


def test_parse_and_input_errors_import_no_torch_flower_or_ray(tmp_path: Path) -> None:
    """--help, every input error and --resume of a finished run answer before torch, Flower, Ray."""
    finished = tmp_path / "finished-run"
    finished.mkdir()
    from ted_fl.config import ExperimentConfig, dump_toml, to_dict

    (finished / "config.toml").write_text(dump_toml(to_dict(ExperimentConfig())))
    (finished / "summary.csv").write_text("approach,seed,avg\nseq,0,0.5\n")
    a_file = tmp_path / "data.txt"
    a_file.write_text("not a folder")
    code = f"HEAVY = {HEAVY!r}\n" + PROBE
    proc = subprocess.run([sys.executable, "-c", code, str(a_file), str(finished)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("heavy") == [], "imported before the input was checked"
    for name in ("simulate --help", "centralized --help", "sites --help", "resume finished", "bench --help",
                 "generalize --help", "sweep --help"):
        assert out[name][0] == 0, (name, out[name])
    for name in ("bad --set", "bad value", "bad approach", "bad config", "data-dir is a file", "privacy secagg",
                 "privacy ewc", "nan lambda_d", "out under a file", "out in /proc"):
        assert out[name][0] == 2, (name, out[name])
    assert out["nan lambda_d"][1] == ["error: --set: loss.lambda_d: input should be a finite number, got nan"]
    assert out["out under a file"][1] == [f"error: output folder '{a_file}/runs' cannot be created: '{a_file}' is "
                                          "a file, not a folder; choose another folder (--out / out)"]
    assert out["out in /proc"][1][0].startswith("error: output folder '/proc/ted-fl-x/runs' cannot be created")
    assert "is a file, not a folder" in out["data-dir is a file"][1][0]
    assert "privacy.secagg" in out["privacy secagg"][1][0] and "'ewc'" in out["privacy ewc"][1][0]
    assert not list(tmp_path.glob("runs/*")), "an input error left a run directory"


def test_bench_subcommands_match_their_modules() -> None:
    """The static list `python -m ted_fl.bench --help` shows is what the modules register."""
    import re

    from ted_fl.bench import COMMANDS

    for name in COMMANDS:  # read, not imported (several import torch)
        text = (REPO / "ted_fl" / "bench" / f"{name}.py").read_text()
        assert re.findall(r'sub\.add_parser\(\s*"([a-z_]+)"', text) == [name], name


def test_resume_of_a_finished_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.commands.shared import run_command
    from ted_fl.config import dump_toml, to_dict

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(dump_toml(to_dict(tiny_config(tmp_path))))
    (run / "summary.csv").write_text("approach,seed,avg\nseq,0,0.5\n")
    assert run_command("simulate", ["--resume", str(run)]) == 0
    assert "already finished; nothing to resume" in capsys.readouterr().out


def test_check_validates_and_stops(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check loads the data as a run would, says what would run, and writes nothing."""
    from ted_fl.commands.shared import run_command
    from tests.unit.test_site_layouts import N, write_small

    toml, data = write_small(tmp_path)
    out = tmp_path / "runs"
    argv = ["--sites", str(toml), "--data-dir", str(data), "--set", f"data.size={N}", "--out", str(out), "--check"]
    assert run_command("simulate", [*argv, "--set", "train.select_best=false"]) == 0
    line = capsys.readouterr().out
    assert "ok:" in line and "H1 -> H2" in line and "2 Flower client node(s)" in line
    assert run_command("simulate", argv) == 2  # the sites have no validation split: the run's own error
    assert "val split is empty" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_missing_numbers_are_words() -> None:
    from ted_fl.run.directory import format_cell, missing_reason
    from ted_fl.run.html_report import summary_table

    assert format_cell("ravg", float("nan")) == "needs joint"
    assert format_cell("ravg[LV]", float("nan")) == "needs joint"
    assert format_cell("ravg", 0.5) == "0.500"
    assert format_cell("bwt", float("nan")) == "n/a"
    assert missing_reason("avg", 0.2) == ""
    html = summary_table(pd.DataFrame({"label": ["seq"], "avg": [0.5], "ravg": [np.nan]}))
    assert "needs joint" in html and "nan" not in html


def test_coinciding_curves_stay_visible() -> None:
    """Two series with the same numbers differ in dash and marker, not only in colour."""
    from ted_fl.run.html_report import _colours, _style

    colours = _colours(["seq", "ted_gugf"])
    a, b = _style(colours, "seq"), _style(colours, "ted_gugf")
    assert a["line"]["dash"] != b["line"]["dash"]
    assert a["marker"]["symbol"] != b["marker"]["symbol"]
    assert a["marker"]["size"] > b["marker"]["size"]  # the first drawn is larger: the second sits inside it


def test_fault_counts_per_site() -> None:
    from ted_fl.federated.server_app import fault_counts

    faults = [dict(site="BMC", outcome="retried"), dict(site="BMC", outcome="unrecovered"),
              dict(site="I2CVB", outcome="retried")]
    c = fault_counts(faults, ["RUNMC", "BMC", "I2CVB"])
    assert (c["faults_seen"], c["faults_retried"], c["faults_unrecovered"]) == (3, 2, 1)
    assert (c["faults_seen[BMC]"], c["faults_retried[BMC]"], c["faults_unrecovered[BMC]"]) == (2, 1, 1)
    assert (c["faults_seen[RUNMC]"], c["faults_unrecovered[I2CVB]"]) == (0, 0)


def test_flower_client_tracebacks_go_to_run_log(tmp_path: Path) -> None:
    """Flower's record of a failing client goes to run.log, not the terminal; others still show."""
    from flwr.common.logger import FLOWER_LOGGER

    from ted_fl.federated.simulation import client_errors_to_log
    from ted_fl.run.directory import RunDir

    run = RunDir(tmp_path)
    shown: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            shown.append(record.getMessage())

    keep = Keep()
    FLOWER_LOGGER.addHandler(keep)

    def emit(path: str, func: str, msg: str, level: int = logging.ERROR) -> None:
        FLOWER_LOGGER.handle(logging.LogRecord("flwr", level, path, 1, msg, None, None, func))

    vce = "/x/flwr/server/superlink/fleet/vce/vce_api.py"
    try:
        with client_errors_to_log(run):
            emit(vce, "worker", "Traceback (most recent call last): boom")
            emit("/x/flwr/simulation/ray_transport/ray_actor.py", "_fetch_future_result", "actor died")
            emit(vce, "run_api", "Simulation Runtime crashed")  # not a client fault: stays on the terminal
            emit("/x/flwr/simulation/app.py", "run", "Starting", logging.INFO)
    finally:
        FLOWER_LOGGER.removeHandler(keep)
    assert shown == ["Simulation Runtime crashed", "Starting"]
    log = (tmp_path / "run.log").read_text()
    assert "boom" in log and "actor died" in log


def test_checkpoint_policy_prunes_at_the_end(tmp_path: Path) -> None:
    import torch

    from ted_fl.run.directory import RunDir
    from ted_fl.schedule.lifecycle import disk_use, prune_run

    for policy, stages_left in (("stages", 3), ("resume", 1), ("all", 3)):
        cfg = tiny_config(tmp_path, ["seq"])
        cfg.output.checkpoints = policy
        run = RunDir(tmp_path / policy)
        w = {"w": np.ones(1000, dtype=np.float32)}
        run.save_checkpoint("seq", 0, "last", dict(done=True, weights=w, teacher=w, best_weights=w, aux={}, rows=[1]))
        for k in range(3):
            run.save_checkpoint("seq", 0, f"stage{k}", {"weights": w, "site": str(k)})
        (run.client_state_dir / "BMC-0").mkdir(parents=True)
        (run.client_state_dir / "BMC-0" / "x.pt").write_bytes(b"0" * 1000)
        prune_run(cfg, run)
        last = torch.load(run.ckpt_dir("seq", 0) / "last.pt", weights_only=False)
        assert last["rows"] == [1]
        assert (last["weights"] is None) == (policy != "all"), policy
        assert run.client_state_dir.exists() == (policy == "all"), policy
        kept = sorted(p.stem for p in run.ckpt_dir("seq", 0).glob("stage*.pt"))
        assert len(kept) == stages_left and kept[-1] == "stage2", (policy, kept)
        assert "MB in" in disk_use(run.path)


def test_progress_prints_lines_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.schedule.lifecycle import Progress

    p = Progress(4, lines=True)
    p(dict(approach="seq", seed=0, stage=0, stages=2, site="A", round=0, rounds=2, loss=0.5))
    p.close()
    out = capsys.readouterr().out
    assert out.startswith("progress: 1/4 | seq s0 | stage 1/2 A | round 1/2 | loss 0.500")


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_a_too_small_simulated_federation_fails_at_once_naming_the_fix(tmp_path: Path) -> None:
    """`flwr run` simulates 2 SuperNodes by default: 3 sites need 3, said at once (not after the
    connect timeout) with the --federation-config to use."""
    from ted_fl.errors import TedFlError
    from ted_fl.federated.server_app import FlowerExecutor

    cfg = tiny_config(tmp_path)
    cfg.federated.connect_timeout = 3600.0

    class Quick(FlowerExecutor):
        SETTLE_S = 0.0

    with pytest.raises(TedFlError, match=r"needs 3 SuperNodes \(3 sites x 1 client\(s\) per site\), the federation "
                                         r"simulates 2; run `flwr run \. --stream --federation-config num-supernodes=3`"):
        Quick(FakeGrid([11, 12]), cfg, None, simulated=True)
    cfg.federated.connect_timeout = cfg.federated.timeout = 0.01
    with pytest.raises(TedFlError, match="only 2 connected within 0 s; start one SuperNode per site"):
        Quick(FakeGrid([11, 12]), cfg, None, simulated=False)  # a deployment: nodes may still come


def test_check_shows_the_data_warnings_the_run_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check prints every warning the run would (an image without its mask), and a note when
    data.size replaces the sizes the site set declares; `sites check` prints the same."""
    from ted_fl.commands.shared import run_command
    from ted_fl.config import DataConfig, ExperimentConfig
    from ted_fl.data import load_sites
    from ted_fl.schedule.lifecycle import data_warnings
    from ted_fl.sites import main as sites_main
    from tests.unit.test_site_layouts import N, write_small

    toml, data = write_small(tmp_path, n_train=4)
    (data / "H1" / "train" / "masks" / "train1.png").unlink()
    argv = ["--sites", str(toml), "--data-dir", str(data), "--out", str(tmp_path / "runs"), "--check"]
    assert run_command("centralized", [*argv, "--set", f"data.size={N}"]) == 0
    out, err = capsys.readouterr()
    missing = "warning: H1: " + str(data / "H1" / "train") + ": skipped 1 image(s) without a mask"
    assert missing in err
    assert (f"note: data.size = {N} replaces the preprocess.size of site set 'small' (H1 64, H2 64 px): every site "
            f"is resampled to {N} x {N}; data.size = 0 keeps each site's own size") in err
    assert out.startswith("ok:") and out.rstrip().endswith("2 data warning(s)/note(s) above")
    cfg = ExperimentConfig()
    cfg.data = DataConfig(sites=str(toml), data_dir=str(data), size=N)
    assert [ln for ln in err.splitlines() if ln.startswith(("warning", "note"))] == \
        data_warnings(cfg, load_sites(cfg.data, cfg.data.split_seed))  # the run's own lines
    assert run_command("centralized", [*argv, "--set", "data.size=64"]) == 0
    assert "note:" not in capsys.readouterr().err  # the declared size: nothing replaced
    assert sites_main(["check", str(toml), "--data-dir", str(data), "--size", str(N)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "skipped 1 image(s) without a mask" in text and f"note: --size = {N} replaces the preprocess.size" in text
    assert not (tmp_path / "runs").exists()


def test_sites_tables_are_whole_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    """Piped (no terminal), `sites list` / `sites check` do not cut names to 80 columns ('Domai…')."""
    from ted_fl.sites import main as sites_main

    assert sites_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert any("RUNMC -> BMC -> I2CVB -> UCL -> BIDMC -> HK" in ln and "prostate_nifti" in ln for ln in out.splitlines())


def test_summary_shows_lower_case_label_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`avg[cup]` is a column name, not rich markup (unescaped, every label column read "avg")."""
    from ted_fl.commands.shared import print_summary
    from ted_fl.run.directory import RunDir

    summary = pd.DataFrame([{"approach": "seq", "seed": 0, "avg": 0.5, "avg[cup]": 0.25, "avg[disc]": 0.75,
                             "bwt": -0.1}])
    print_summary(summary, RunDir(tmp_path / "run[x]"))
    out = capsys.readouterr().out
    assert "avg[cup]" in out and "avg[disc]" in out and "run[x]" in out
