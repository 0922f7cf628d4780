"""The cell runner's parts (ted_fl.schedule.cells): how many cells run at once, the thread runner's failures,
the progress counter of a resumed run, and the simulated SuperNode blocks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ted_fl.config import ExperimentConfig, set_key
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir
from ted_fl.schedule import cells
from ted_fl.schedule.cells import Job, cell_resources, cell_slots, run_jobs
from ted_fl.schedule.lifecycle import Progress, rounds_done, schedule_rounds


def machine(monkeypatch: pytest.MonkeyPatch, cpus: int, gpus: int = 0) -> None:
    monkeypatch.setattr(cells, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(cells, "gpu_count", lambda cfg: 0 if cfg.train.device == "cpu" else gpus)


def test_auto_takes_the_cores_over_the_threads_a_cell_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExperimentConfig()
    machine(monkeypatch, cpus=2)
    assert cell_slots(cfg, 9) == 2  # the default run on this project's 2-core CPU
    assert cell_slots(cfg, 1) == 1
    machine(monkeypatch, cpus=16)
    assert cell_slots(cfg, 9) == 9
    cfg.train.threads = 4
    assert cell_slots(cfg, 9) == 4
    cfg.federated.num_cpus = 8
    assert cell_slots(cfg, 9, federated=True) == 2  # a federated cell's client holds federated.num_cpus


def test_auto_on_a_gpu_shares_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExperimentConfig()
    machine(monkeypatch, cpus=16, gpus=1)
    assert cell_slots(cfg, 36) == cells.GPU_CELLS
    assert cell_resources(cfg) == {"num_cpus": 1.0, "num_gpus": 1.0 / cells.GPU_CELLS}
    cfg.federated.num_gpus = 0.25
    assert cell_slots(cfg, 36) == 4 and cell_slots(cfg, 36, federated=True) == 4
    assert cell_slots(cfg, 2) == 2
    cfg.train.device = "cpu"
    assert cell_slots(cfg, 36) == 16 and cell_resources(cfg)["num_gpus"] == 0.0


def test_a_number_is_taken_as_given_and_a_cluster_schedules_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ExperimentConfig()
    machine(monkeypatch, cpus=2)
    set_key(cfg, "train.cells_in_parallel", 3)
    assert cell_slots(cfg, 9) == 3 and cell_slots(cfg, 2) == 2
    set_key(cfg, "train.cells_in_parallel", "auto")
    cfg.federated.ray_address = "auto"
    assert cell_slots(cfg, 9) == 9


def test_the_key_is_refused_in_one_line() -> None:
    cfg = ExperimentConfig()
    with pytest.raises(TedFlError, match=r"train.cells_in_parallel = 0 is not one of 'auto' or a whole number >= 1"):
        set_key(cfg, "train.cells_in_parallel", 0)


def test_a_cells_identity_ignores_how_many_run_at_once() -> None:
    from ted_fl.studies.grid import config_hash

    a, b = ExperimentConfig(), ExperimentConfig()
    b.train.cells_in_parallel = 1
    assert config_hash(a) == config_hash(b)
    b.train.threads = 2  # the thread count is part of what fixes the numbers
    assert config_hash(a) != config_hash(b)


def _job(name: str, wait: float, log: list[str], fail: bool = False) -> Job:
    def fn(*, progress: Any, slot: int) -> str:
        log.append(f"start {name} slot {slot}")
        progress({"cell": name})
        time.sleep(wait)
        if fail:
            raise TedFlError(f"{name} broke")
        return name.upper()

    return Job(name, fn)


def test_threads_run_cells_at_once_and_name_a_failure() -> None:
    log: list[str] = []
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def progress(info: dict[str, Any]) -> None:
        with lock:
            seen.append(info)

    jobs = [_job("a", 0.3, log), _job("b", 0.3, log, fail=True), _job("c", 0.0, log)]
    results, failures = run_jobs(jobs, 2, progress, where="thread", keep_going=True)
    assert results == {"a": "A", "c": "C"} and list(failures) == ["b"]
    assert {e.split(" slot ")[0] for e in log[:2]} == {"start a", "start b"}  # both slots at once
    assert len(seen) == 3
    with pytest.raises(TedFlError, match="b broke"):
        failures.raise_first()
    # without keep_going, a failure stops the cells that have not started
    log.clear()
    jobs = [_job("a", 0.0, log, fail=True), _job("b", 0.0, log, fail=True), _job("c", 0.0, log)]
    results, failures = run_jobs(jobs, 1, None)
    assert not results and list(failures) == ["a"] and log == ["start a slot 0"]


def test_two_failures_are_one_line_naming_both() -> None:
    failures = cells.Failures(a=TedFlError("x"), b=RuntimeError("y\nlast line"))
    with pytest.raises(TedFlError, match=r"2 cells failed: a: x; b: RuntimeError: last line"):
        failures.raise_first()


def test_progress_of_a_resumed_run_counts_from_its_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: after --resume the counter went 1/48 .. 16/48 with a wrong time left."""
    info = dict(approach="seq", seed=0, stage=3, stages=6, site="UCL", round=0, rounds=4, loss=0.5)
    p = Progress(48, lines=True, done=32)
    p.t0 -= 10.0  # 10 s into this session
    p(info)
    out = capsys.readouterr().out
    assert "progress: 33/48" in out
    left = float(out.split("~")[1].split(" s left")[0])
    assert left == pytest.approx(10.0 * 15, rel=0.05)  # one round in 10 s, 15 left (not 10 / 33 * 15)
    fresh = Progress(48, lines=True)
    fresh.t0 -= 10.0
    fresh(info)
    assert "progress: 1/48" in capsys.readouterr().out


def test_rounds_done_reads_the_checkpoint(tmp_path: Path) -> None:
    cfg = ExperimentConfig()
    run = RunDir(tmp_path)
    assert rounds_done(run, cfg, "seq", 0, 6) == 0
    run.save_checkpoint("seq", 0, "last", {"stage": 2, "round": 3, "done": False})
    assert rounds_done(run, cfg, "seq", 0, 6) == 2 * 4 + 3
    run.save_checkpoint("joint", 0, "last", {"stage": 6, "round": 0, "done": True})
    assert rounds_done(run, cfg, "joint", 0, 6) == 6 * 8
    assert schedule_rounds(cfg, "joint", 6) == (6, 8)
    cfg.protocol = "reference"
    assert schedule_rounds(cfg, "joint", 6) == (1, 8)  # the one-run joint


def test_simulated_nodes_serve_the_sites_in_blocks() -> None:
    """A simulation of 2 blocks x 3 sites: partition 4 serves the second site again; a larger
    federation's leftover partitions stay idle (flwr run with an extra SuperNode)."""
    from flwr.app import Context, RecordDict

    from ted_fl.federated.client_app import identity, serving_partitions

    cfg = ExperimentConfig()
    cfg.data.order = ["RUNMC", "BMC", "I2CVB"]

    def ctx(pid: int, total: int) -> Context:
        return Context(run_id=1, node_id=pid + 1, node_config={"partition-id": pid, "num-partitions": total},
                       state=RecordDict(), run_config={})

    assert identity(ctx(4, 6), cfg) == ("BMC", 0)
    assert identity(ctx(2, 6), cfg) == ("I2CVB", 0)
    assert serving_partitions(ctx(3, 4), cfg) == 3  # 4 nodes for 3 sites: the 4th is idle
    with pytest.raises(RuntimeError, match="partition 3 has no site"):
        identity(ctx(3, 4), cfg)
