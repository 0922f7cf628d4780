"""`flwr run .`: the same run as `python -m ted_fl.simulate`, submitted through Flower's CLI.

`app` is the ServerApp pyproject.toml names (`[tool.flwr.app.components]`); its main calls
`run_app`. It checks the run
config and the data exactly as the command line does (an error is one line in the stream and
no run directory), writes the same run directory (config.toml, command.txt, machine.json,
splits.json, run.log, metrics, summary, report.html), prints a progress line per round (the
stream is no terminal), says how many SuperNodes the experiment uses (and fails at once, naming
the fix, when a simulated federation is too small), routes Flower's tracebacks of a recovered
client fault to run.log, and, when `flwr run` started a local SuperLink for it, starts
`ted_fl.federated.reaper` so that SuperLink does not outlive the command.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from flwr.serverapp import Grid, ServerApp

from ted_fl.config import from_run_config
from ted_fl.errors import TedFlError
from ted_fl.federated.reaper import start

# Loaded with the ServerApp, before Flower starts the simulated clients: importing torch and MONAI
# here, not in the ServerApp thread while the ClientApp loads them in another, avoids MONAI's
# partially-initialised-module error.
from ted_fl.federated.server_app import serve  # noqa: E402
from ted_fl.federated.simulation import client_errors_to_log, stoppable_grid
from ted_fl.files import check_creatable
from ted_fl.run.directory import format_cell
from ted_fl.run.processes import ProcessRecord
from ted_fl.schedule.experiment import ResolvedExperiment, resolve
from ted_fl.schedule.lifecycle import (
    Progress,
    disk_use,
    finish_run,
    load_and_record_sites,
    mark_run_failed,
    prune_run,
    total_rounds,
    write_report_if_available,
)


def command_of(run_config: dict[str, Any], nodes: int) -> list[str]:
    """A `flwr run` command that reproduces this run (Flower does not tell the app its own)."""
    pairs = " ".join(f"{k}={_toml_value(v)}" for k, v in sorted(run_config.items()))
    return ["flwr", "run", ".", "--stream", "--federation-config", f"num-supernodes={nodes}", "--run-config", pairs]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_app(grid: Any, context: Any) -> None:
    """The whole `flwr run` job; an input error is one `error:` line, never a traceback."""
    run_config = dict(context.run_config)
    keep = str(run_config.pop("keep_superlink", False)).lower() in ("1", "true", "yes")
    if not keep:
        try:
            start(os.getpid(), getattr(context, "run_id", ""))
        except Exception as exc:  # never let the clean-up helper stop a run
            print(f"warning: the SuperLink will not be stopped after this run ({exc})", file=sys.stderr)
    run = None
    record = None
    try:
        exp, sites = validate(run_config)
        cfg = exp.cfg
        from ted_fl.run.processes import reap_folder
        from ted_fl.schedule.lifecycle import start_run

        reaped = reap_folder(cfg.out)
        nodes = len(sites) * cfg.federated.clients_per_site
        run = start_run(exp, "flwr", [], command=command_of(run_config, nodes))
        if reaped:
            run.log(f"note: ended {reaped} process(es) left by a killed run")
        record = ProcessRecord(run.path)
        record.update("starting")
        run.record = record
        _run(grid, cfg, run, sites)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        if run is not None:
            _failed(run, str(exc))
    except Exception as exc:  # Flower prints the traceback; the run directory must not look like a result
        if run is not None:
            _failed(run, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if record is not None:
            record.close()


def _failed(run: Any, error: str) -> None:
    """As the command line does (`run.mark_run_failed`), the error also in run.log."""
    run.log(f"error: {error}")
    mark_run_failed(run, error, f"python -m ted_fl.simulate --resume {run.path}")


def validate(run_config: dict[str, Any]) -> tuple[ResolvedExperiment, list]:
    """The run config through the schema, the experiment resolved once (`resolve`: one split per Flower
    run, out channels, every [privacy] rule, the network under DP), then the data: the command line's
    checks, in its order."""
    from ted_fl.schedule.lifecycle import check_data

    cfg = from_run_config(run_config)
    check_creatable(cfg.out, "run config key out")  # before the data and torch load
    exp = resolve(cfg, federated=True)
    return exp, check_data(exp.cfg)


def _run(grid: Any, cfg: Any, run: Any, sites: list) -> None:
    load_and_record_sites(cfg, run)
    print(f"writing to {run.path.resolve()}", flush=True)
    run.log(f"flwr run: approaches {cfg.approaches}, seeds {cfg.seeds}, sites {cfg.data.sites}")
    t0 = time.perf_counter()
    progress = Progress(total_rounds(cfg, len(sites)), quiet=False, lines=True)
    stoppable_grid(grid)
    with client_errors_to_log(run):
        extras = serve(grid, cfg, run, progress)
    summary = finish_run(cfg, run, extras)
    run.log(f"done in {time.perf_counter() - t0:.1f} s")

    cols = [c for c in ("approach", "seed", "avg", "ravg", "bwt", "forgetting", "faults_seen", "faults_retried",
                        "faults_unrecovered", "wall_s") if c in summary.columns]
    print("  ".join(cols))
    for _, row in summary.iterrows():
        print("  ".join(format_cell(c, row[c]) for c in cols))
    report = write_report_if_available(run)
    if report:
        print(f"report: {report.resolve()}")
    prune_run(cfg, run)
    print(f"disk use: {disk_use(run.path)} (output.checkpoints = {cfg.output.checkpoints})")
    print(f"run directory: {run.path.resolve()}", flush=True)


def _server_app() -> Any:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Any) -> None:
        """Run an experiment from the app's run config (pyproject.toml [tool.flwr.app.config])."""
        run_app(grid, context)

    return app


app = _server_app()
