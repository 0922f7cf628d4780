"""`step`: what one training step of each approach costs against a seq step, and against its floor.

A seq step is one student forward and backward on the batch plus Adam. A TED step adds a
student forward and backward on the SKA probes (as many as images unless loss.ska_count says
otherwise) and the teacher's forwards on the batch and on the probes. Its floor is therefore

    floor = (2 * fwd_bwd + teacher_fwd(batch + probes) + adam) / (fwd_bwd + adam)

with each piece timed alone on the same model, batch and threads (about 2.7x when a forward
is a third of a forward + backward). Everything measured above the floor is overhead of the
step itself (recomputation, copies, extra passes). Approaches are timed interleaved (a few
steps of each, repeated), so that a load change on a shared machine hits them alike; each
figure is the median over the repeats. On a CPU the clock is the process's CPU time (see
`Bench.timed`), so that a shared machine's load does not decide the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig
from ted_fl.data import resolve_out_channels

APPROACHES = ["seq", "kd", "ska", "akt", "akt_gugf", "ted", "ted_gugf"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("step", help="per-approach step time against a seq step and the TED floor")
    C.add_arguments(p, quick="tiny model, few steps (the test suite's)", out="unused (accepted like every subcommand)")
    p.add_argument("--approach", nargs="+", help=f"approaches (default {' '.join(APPROACHES)})")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 15; --quick 2)")
    p.add_argument("--steps", type=int, help="steps per approach and repeat (default 4; --quick 2)")
    p.add_argument("--separate", action="store_true",
                   help="one teacher forward per input (batch, probes) instead of one over both")
    p.add_argument("--json", help="also save the measured table here (for a later --before)")
    p.add_argument("--before", help="a --json file of an earlier run: shown as 'before' next to this run")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    return C.workload(args, one_seed=False, batch=4)


class Bench:
    """A student, a teacher, one batch and its probes: timed steps of any approach."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device | None = None) -> None:
        from ted_fl.continual.networks import build_model
        from ted_fl.continual.probes import make_probes
        from ted_fl.continual.training import set_determinism

        set_determinism(0, cfg.train.threads)
        resolve_out_channels(cfg)  # out_channels = 0: the site set's classes + background
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        b, s = cfg.train.batch_size, cfg.data.size
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(b, cfg.model.in_channels, s, s, generator=g).to(self.device)
        self.y = (torch.rand(b, s, s, generator=g) > 0.8).long().to(self.device)
        count = cfg.loss.ska_count or b
        self.probes = make_probes(1, count, (cfg.model.in_channels, s, s), cfg.loss).to(self.device)
        self.student = build_model(cfg.model).to(self.device)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-4)
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

    def step(self, name: str, separate: bool = False, amp: torch.dtype | None = None, compile: str = "off") -> None:  # noqa: A002
        """One step of `name`; `compile` "on": the forwards through train.compile's compiled callables."""
        from ted_fl.continual.approaches import get_approach
        from ted_fl.continual.compiled import compiled, step_begins
        from ted_fl.continual.step import train_step

        appr = get_approach(name, self.cfg.loss)
        teacher = self.teacher if appr.needs_teacher else None
        kwargs: dict[str, Any] = {"fuse_teacher": False} if separate else {}
        if amp is not None:
            kwargs["amp"] = amp
        if compile == "on":
            kwargs["student_fwd"] = compiled(self.student, compile)
            kwargs["teacher_fwd"] = compiled(self.teacher, compile) if teacher is not None else None
            step_begins(kwargs["student_fwd"])
        train_step(self.student, teacher, appr, self.x, self.y, self.opt,
                   probes=self.probes if appr.needs_probes else None, **kwargs)

    def timed(self, fn: Any, n: int) -> float:
        """Mean seconds of `fn` over n calls: this process's CPU time on a CPU (with one torch
        thread it is the step's cost, and other work on a shared machine barely moves it, where
        wall time doubles), wall time synchronised on a GPU."""
        clock = time.process_time if self.device.type == "cpu" else time.perf_counter
        self.sync()
        t0 = clock()
        for _ in range(n):
            fn()
        self.sync()
        return (clock() - t0) / n

    def pieces(self) -> dict[str, Any]:
        """The floor's pieces: student forward + backward, teacher forward, Adam, each alone."""
        from ted_fl.continual import terms as T

        def fwd_bwd() -> None:
            self.student.train()
            logits = self.student(self.x)
            T.SegLoss()(T.probabilities(logits), T.one_hot(self.y, logits.shape[1]).to(logits)).backward()

        def teacher_fwd() -> None:
            self.teacher.eval()
            with torch.inference_mode():
                self.teacher(torch.cat([self.x, self.probes]))

        def adam() -> None:
            self.opt.step()

        return {"student fwd+bwd": fwd_bwd, "teacher fwd (batch+probes)": teacher_fwd, "adam": adam}


def measure(bench: Bench, approaches: list[str], repeats: int, steps: int, separate: bool) -> pd.DataFrame:
    """Median step seconds per approach (and the floor's pieces), interleaved over repeats."""
    pieces = bench.pieces()
    names = list(approaches) + list(pieces)
    fns = {a: (lambda a=a: bench.step(a, separate)) for a in approaches} | pieces
    for fn in fns.values():  # warm-up: allocator, autotuning, first-call costs
        bench.timed(fn, 2)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            times[n].append(bench.timed(fns[n], steps))
    return pd.DataFrame([dict(name=n, step_ms=1000 * float(np.median(times[n]))) for n in names])


def table(raw: pd.DataFrame, batch: int, probes: int) -> tuple[pd.DataFrame, float]:
    """Per approach: ms, ratio to seq, images/s; and the TED floor ratio from the pieces."""
    t = raw.set_index("name")["step_ms"]
    fb, tf, adam = t["student fwd+bwd"], t["teacher fwd (batch+probes)"], t["adam"]
    seq = t["seq"] if "seq" in t else fb + adam
    floor = (fb + fb * probes / batch + tf + adam) / (fb + adam)
    rows = []
    for name in [n for n in raw["name"] if n not in ("student fwd+bwd", "teacher fwd (batch+probes)", "adam")]:
        rows.append(dict(approach=name, step_ms=t[name], ratio_to_seq=t[name] / seq,
                         images_per_s=1000 * batch / t[name]))
    return pd.DataFrame(rows), float(floor)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = workload(args)
    approaches = args.approach or APPROACHES
    if "seq" not in approaches:
        approaches = ["seq", *approaches]
    repeats = args.repeats or (2 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 4)
    count = cfg.loss.ska_count or cfg.train.batch_size
    t0 = time.perf_counter()
    raw = measure(Bench(cfg), approaches, repeats, steps, args.separate)
    df, floor = table(raw, cfg.train.batch_size, count)
    pieces = raw[raw["name"].isin(["student fwd+bwd", "teacher fwd (batch+probes)", "adam"])]
    C.print_table(f"step: {cfg.data.size} px, batch {cfg.train.batch_size}, {count} probes, "
                  f"teacher_mode {cfg.loss.teacher_mode}", df)
    C.print_table("floor pieces (ms)", pieces)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"table": df.to_dict("records"), "floor": floor,
                                               "pieces": pieces.to_dict("records")}, indent=1))
    shown = df.copy()
    before_note = ""
    if args.before:
        old = json.loads(Path(args.before).read_text())
        prev = pd.DataFrame(old["table"]).set_index("approach")
        shown["before_ms"] = [prev["step_ms"].get(a, float("nan")) for a in shown["approach"]]
        shown["before_ratio"] = [prev["ratio_to_seq"].get(a, float("nan")) for a in shown["approach"]]
        before_note = (f" `before_*` columns: the same command on the step before this optimisation, "
                       f"saved with `--json` and read back from `{args.before}` (its floor: {old['floor']:.2f}).")
    ted = df.set_index("approach")["ratio_to_seq"].get("ted_gugf", float("nan"))
    line = f"step: ted_gugf/seq {ted:.2f} (floor {floor:.2f}), " + ", ".join(
        f"{r.approach} {r.ratio_to_seq:.2f}" for r in df.itertuples() if r.approach not in ("seq", "ted_gugf"))
    body = (
        f"{C.section_head('step', argv, time.perf_counter() - t0)}\n\n"
        f"Workload: `{args.config}` model (channels {cfg.model.channels}, norm {cfg.model.norm}), "
        f"{cfg.data.size} px, batch {cfg.train.batch_size}, {count} SKA probes per step, "
        f"teacher_mode {cfg.loss.teacher_mode}, {cfg.train.threads} torch thread(s), CPU; times are the "
        f"process's CPU time per step (robust to the shared machine's load). "
        f"Median over {repeats} interleaved repeats of {steps} steps each. "
        f"The floor of a TED step is (2 x student fwd+bwd + teacher fwd over batch and probes + Adam) / "
        f"(student fwd+bwd + Adam), from the pieces timed alone: **{floor:.2f}**.{before_note}\n\n"
        f"{C.md_table(shown)}\n\nFloor pieces (ms):\n\n{C.md_table(pieces)}\n\n`{line}`"
    )
    return C.finish(args, "step", line, body)
