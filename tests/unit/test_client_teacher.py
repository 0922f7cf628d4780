"""Where a node keeps the stage's teacher: in the worker's memory and the site's state folder, not in
context.state (which Flower's simulation ships to the Ray worker and back with every message)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from ted_fl.federated import client_app as CA
from ted_fl.federated import messages as M


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
            "norm.num_batches_tracked": np.array(7, dtype=np.int64)}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Equal to what the message itself decodes to (shapes and dtypes included)."""
    b = M.from_record(M.to_record(b))
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_the_teacher_stays_off_the_context_and_another_worker_reads_it(tmp_path: Path) -> None:
    c = {"approach": "kd", "seed": 0, "client_state_dir": str(tmp_path)}
    teacher, aux = _arrays(1), {"fisher": np.arange(3, dtype=np.float32)}
    ctx = _context()
    content = RecordDict({M.TEACHER: M.to_record(teacher), M.AUX: M.to_record(aux)})
    t, a = CA._teacher(ctx, c, "BMC", 0, content, "kd|0|1")
    assert _same(t, teacher) and _same(a, aux)
    assert not set(ctx.state.keys()) & {"teacher", "aux"}  # nothing model-sized travels with the context
    # Another Ray worker (an empty process cache) serving the same node: from the site's folder.
    slot, file = CA._teacher_slot(c, "BMC", 0, ctx)
    assert file is not None and file.is_file() and file.parent == tmp_path / "kd-s0" / "BMC-0"  # per schedule (approach, seed)
    CA._CACHE.pop(slot)
    t, a = CA._teacher(ctx, c, "BMC", 0, RecordDict(), "kd|0|1")
    assert _same(t, teacher) and _same(a, aux)
    # A later stage's key is not this teacher: the server must resend.
    with pytest.raises(RuntimeError, match="never received"):
        CA._teacher(ctx, c, "BMC", 0, RecordDict(), "kd|0|2")
    CA._drop_teacher(ctx, c, "BMC", 0)
    assert not file.exists() and slot not in CA._CACHE


def test_without_a_state_folder_the_context_keeps_it(tmp_path: Path) -> None:
    c = {"approach": "kd", "seed": 3, "client_state_dir": ""}
    teacher = _arrays(2)
    ctx = _context()
    CA._teacher(ctx, c, "RUNMC", 0, RecordDict({M.TEACHER: M.to_record(teacher)}), "kd|3|1")
    assert "teacher" in ctx.state
    CA._CACHE.pop(CA._teacher_slot(c, "RUNMC", 0, ctx)[0])
    t, a = CA._teacher(ctx, c, "RUNMC", 0, RecordDict(), "kd|3|1")
    assert _same(t, teacher) and a == {}
    CA._drop_teacher(ctx, c, "RUNMC", 0)
