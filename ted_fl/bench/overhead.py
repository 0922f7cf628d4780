"""`overhead`: the same workload through the simulator and the centralized run, alternated.

Both are started as fresh processes (`python -m ted_fl.simulate` / `ted_fl.centralized`), so
the end-to-end wall time includes the imports, the data loading and, for the simulator, Ray's
start. The per-round figures come from the schedule's own `round_s` rows (the training call,
the FedAvg and the best-round selection), in steady state: every round but the first of each
stage, which pays for the stage's teacher and the actors' first data load. Peak memory is the
sum of RSS over each process tree (Ray's GCS, raylet and ClientApp actors included).

Then Flower's own floor on the same engine (`ted_fl.bench.floor`): a ClientApp that only echoes,
so the share of a round's overhead that is Flower's is measured, not assumed (`--floor-only`).
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig


def add_parser(sub: Any) -> None:
    p = sub.add_parser("overhead", help="simulator vs centralized run: wall time end to end, per round, memory")
    C.add_arguments(p, quick="tiny workload, one pair (the test suite's)")
    p.add_argument("--repeats", type=int, help="C, F pairs (default 2; --quick 1)")
    p.add_argument("--floor-rounds", type=int, help="exchanges per variant of the bare-Flower floor (default 40; --quick 5)")
    p.add_argument("--floor-only", action="store_true",
                   help="only Flower's floor (a ClientApp that echoes, on the same engine): print it, write nothing")
    p.add_argument("--fast-polling", action="store_true",
                   help="federated.fast_polling = true: the simulator with the latency patch (default: Flower's own path)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = C.workload(args, order=["RUNMC", "BMC", "I2CVB"], rounds=3, steps=5, batch=4)
    if args.fast_polling:
        cfg.federated.fast_polling = True
    return cfg


def message_path(cfg: ExperimentConfig, reps: int = 20) -> pd.DataFrame:
    """Each piece of a round's message path, timed alone on the workload's model (median ms)."""
    import torch
    from flwr.app import Array, ArrayRecord, RecordDict

    from ted_fl.continual.networks import build_model
    from ted_fl.continual.probes import make_probes
    from ted_fl.continual.weights import model_weights
    from ted_fl.federated import messages as M

    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, cfg.data.size, cfg.data.size)).sum().backward()
    opt.step()
    state = opt.state_dict()
    weights = model_weights(model)
    rec = M.to_record(weights)
    count = (cfg.loss.ska_count or cfg.train.batch_size) * cfg.train.steps_per_round
    probes = make_probes(1, count, (1, cfg.data.size, cfg.data.size), cfg.loss)
    msg = RecordDict({M.WEIGHTS: rec, M.PROBES: ArrayRecord({"probes": Array(probes.numpy())})})
    tmp = Path(tempfile.mkdtemp()) / "optimizer.pt"

    def opt_file() -> None:
        torch.save(state, tmp)

    pieces = {
        "weights -> ArrayRecord (server and client)": lambda: M.to_record(weights),
        "ArrayRecord -> weights (server and client)": lambda: M.from_record(rec),
        "SKA probes synthesised (server, per round)": lambda: make_probes(1, count, probes.shape[1:], cfg.loss),
        "train message pickled + unpickled (Ray)": lambda: pickle.loads(pickle.dumps(msg)),
        "Adam state file on the site's disk (written every round)": opt_file,
    }
    rows = []
    for name, fn in pieces.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append(dict(piece=name, ms=1000 * float(np.median(times))))
    return pd.DataFrame(rows)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = workload(args)
    floor_rounds = args.floor_rounds or (5 if args.quick else 40)
    if args.floor_only:
        from ted_fl.bench.floor import flower_floor

        C.print_table("Flower's floor: one exchange with a ClientApp that only echoes (ms)",
                      flower_floor(cfg, floor_rounds))
        return 0
    repeats = args.repeats or (1 if args.quick else 2)
    work = Path(args.out) / time.strftime("overhead-%Y%m%d-%H%M%S")
    rows = []
    for i in range(repeats):
        for mode in ("centralized", "simulate"):
            m = C.run_cli(mode, cfg, work, f"{mode}-{i}")
            t = C.time_rows(m.run)
            steady = C.steady_rounds(m.run)
            rows.append(dict(
                mode=mode, repeat=i, wall_s=m.wall_s, run_wall_s=float(m.run.summary()["wall_s"].sum()),
                round_s_median=float(steady["round_s"].median()),
                beside_work_s_median=float(steady["overhead_s"].median()), round_s_first=float(
                    t[(t["metric"] == "round_s") & (t["round"] == 0)]["value"].median()),
                eval_s_median=float(t[t["metric"] == "eval_s"]["value"].median()),
                peak_rss_mib=C.mib(m.peak_rss), run_dir=str(m.run.path),
            ))
            print(f"  {mode} #{i}: {m.wall_s:.1f} s end to end, steady round {rows[-1]['round_s_median']:.3f} s, "
                  f"peak {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    df = pd.DataFrame(rows)
    by = df.groupby("mode")[["wall_s", "run_wall_s", "round_s_median", "beside_work_s_median", "round_s_first",
                             "eval_s_median", "peak_rss_mib"]].mean()
    fed, cen = by.loc["simulate"], by.loc["centralized"]
    # Ratios per pair (F_i / C_i), averaged: each pair ran back to back under the same load.
    piv = df.pivot(index="repeat", columns="mode")
    e2e = float(np.mean(piv["wall_s"]["simulate"] / piv["wall_s"]["centralized"]))
    per_round = float(np.mean(piv["round_s_median"]["simulate"] / piv["round_s_median"]["centralized"]))
    ratios = pd.DataFrame([
        dict(measure="end to end (s)", centralized=cen["wall_s"], simulator=fed["wall_s"], ratio=e2e, target="<= 1.15"),
        dict(measure="schedule wall, Ray start excluded (s)", centralized=cen["run_wall_s"],
             simulator=fed["run_wall_s"], ratio=fed["run_wall_s"] / cen["run_wall_s"], target=""),
        dict(measure="round, steady state, median (s)", centralized=cen["round_s_median"],
             simulator=fed["round_s_median"], ratio=per_round, target="<= 1.05"),
        dict(measure="added per steady round (s)", centralized=0.0,
             simulator=fed["round_s_median"] - cen["round_s_median"], ratio=float("nan"), target=""),
        dict(measure="round beside the client's own work, median (s)", centralized=cen["beside_work_s_median"],
             simulator=fed["beside_work_s_median"], ratio=float("nan"), target=""),
        dict(measure="first round of a stage, median (s)", centralized=cen["round_s_first"],
             simulator=fed["round_s_first"], ratio=fed["round_s_first"] / cen["round_s_first"], target=""),
        dict(measure="stage-end test evaluation, median (s)", centralized=cen["eval_s_median"],
             simulator=fed["eval_s_median"], ratio=fed["eval_s_median"] / cen["eval_s_median"], target=""),
        dict(measure="peak RSS of the process tree (MiB)", centralized=cen["peak_rss_mib"],
             simulator=fed["peak_rss_mib"], ratio=fed["peak_rss_mib"] / cen["peak_rss_mib"], target=""),
    ])
    C.print_table("overhead: simulator / centralized (mean over the pairs)", ratios)
    path = message_path(cfg)
    C.print_table("message path, each piece timed alone (median ms)", path)
    from ted_fl.bench.floor import flower_floor

    floor = flower_floor(cfg, floor_rounds, (bool(args.fast_polling),) if args.quick else (False, True))
    C.print_table("Flower's floor: one exchange with a ClientApp that only echoes (ms)", floor)
    own = floor[(floor["engine"].str.startswith("federated") == bool(args.fast_polling))
                & (floor["payload"] != "empty message")
                & floor["exchange"].str.startswith("ted-fl")]["ms_median"].iloc[0]
    line = (f"overhead: end-to-end ratio {e2e:.2f}, steady-state per-round ratio {per_round:.2f}, beside the "
            f"client's work {1000 * fed['beside_work_s_median']:.0f} ms a round, Flower's floor {own:.0f} ms")
    per_run = df.drop(columns=["run_dir"])
    body = (
        f"{C.section_head('overhead', argv)}\n\n"
        f"Workload: `{args.config}` ({cfg.data.sites}, {cfg.data.size} px, approaches "
        f"{', '.join(cfg.approaches)}, {cfg.train.rounds} rounds x {cfg.train.steps_per_round} steps "
        f"per site, seed {cfg.seeds[0]}), run as fresh processes alternated "
        f"{', '.join(['C, F'] * repeats)} (C = `python -m ted_fl.centralized`, F = `python -m "
        "ted_fl.simulate`, Ray with one ClientApp actor per core). End to end includes imports, data "
        "loading and Ray's start; steady-state rounds are every round but a stage's first "
        "(`round_s` rows of metrics.csv: the training call, FedAvg, the best-round selection); "
        "'beside the client's own work' is round_s - work_s inside each run (work_s: the client's "
        "`train_round`, timed by the worker), which a change of load between runs does not move; "
        "ratios are per C/F pair, then averaged. Peak RSS is summed over the whole process tree "
        "(shared pages counted per process).\n\n"
        f"{C.md_table(ratios)}\n\nPer run:\n\n{C.md_table(per_run)}\n\n"
        f"The message path of one round, each piece timed alone on the workload's model "
        f"(median of 20, ms):\n\n{C.md_table(path)}\n\n"
        f"Flower's floor (`ted_fl.bench.floor`): the same engine (`federated.simulation.launch`, Ray, one "
        f"ClientApp actor per core), one node whose ClientApp only echoes the message, "
        f"{floor_rounds} exchanges per row after one to start the actor; "
        "the round trip as the ServerApp sees it (ms):\n\n"
        f"{C.md_table(floor)}\n\n`{line}`"
    )
    return C.finish(args, "overhead", line, body + PROFILE_NOTE)


PROFILE_NOTE = """

What stands between the simulator and the reference loop (the tables above are the measurement;
`python -m ted_fl.bench overhead --floor-only` reruns the floor alone in about a minute):

* **Flower's floor: the hand-over thread.** Flower 1.41's simulation runtime moves messages from
  the link state to the Ray backend in a thread that looks once every 0.1 s
  (`vce_api.add_messages_to_queue`, private, with no setting). A round's message waits for the
  next look: 0-100 ms, about 50 ms on average when the client's work is not a multiple of 0.1 s
  (the floor's "busy" rows); back-to-back exchanges with no work lock onto it and take one full
  0.1 s each (its "empty" rows). No public API changes that period, so with Flower's own engine
  this wait is the floor of a round's overhead. `federated.fast_polling = true`
  (`--fast-polling`; off by default, since it replaces that private function) wakes the thread as
  soon as the ServerApp pushes: the floor rows under "federated.fast_polling" show what is left
  then (the Ray actor call and the message's serialisation).
* **The server's wait for replies** (removed). Flower's `Grid.send_and_receive` sleeps 0.1 s between
  pulls, a second 0-100 ms wait per round. ted-fl's exchange (`server_app.send_and_receive`) uses
  the public `push_messages` / `pull_messages` and polls every max(2 ms, 2% of the time waited), so
  a reply is seen within a few ms; the floor's "busy" rows compare both exchanges.
* **What travels per round**: the model record both ways and the SKA probes down (the
  message-path table); the teacher once per stage per node. The node's `Context`, which Flower
  ships to the Ray actor and back with every message, no longer carries the teacher: the client
  keeps it in the worker's memory and in the site's state folder (decoded once per stage), so
  the context is a few kB whatever the model.
* **The client's own per-round cost beside its training**: Adam's moments written to the site's
  state folder every round (for a resume, and for another Ray worker that may serve the node next
  round; the message-path table's file row), and the weights' encoding and decoding.
* **Fixed costs** that a short workload cannot amortise: Ray's start (GCS, raylet, one
  ClientApp actor per core) and each actor's first load of a site's data (the first round
  of a stage). They dominate the end-to-end ratio of a workload of a minute or two, and they
  are the difference between the end-to-end and the steady-state rows.
* **The machine.** On 2 cores shared with other jobs, the simulator's driver, Ray's daemons
  and the training actor compete for the same cores, which the one-process reference does not.
"""
