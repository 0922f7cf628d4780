"""Several experiment configurations through one Flower simulation (Ray starts once).

The accuracy benchmark tunes the distillation weights per approach, so its approaches run
with different `[loss]` sections. Each configuration gets its own run directory and its own
`FlowerExecutor`, whose hello message carries that configuration's TOML to every client node
(the ClientApp keeps the latest one in `context.state`): the same ServerApp, ClientApp and
schedule as `python -m ted_fl.simulate`, without paying Ray's start-up per configuration.
"""

from __future__ import annotations

from ted_fl.config import ExperimentConfig
from ted_fl.federated.simulation import simulate_groups as serve_groups
from ted_fl.run.directory import RunDir
from ted_fl.schedule.experiment import resolve
from ted_fl.schedule.lifecycle import finish_run, load_and_record_sites


def simulate_groups(groups: list[tuple[ExperimentConfig, RunDir]]) -> None:
    """Run every (config, run directory) pair in turn inside one Flower simulation.

    All configurations must share the data section (same sites, so the same client nodes).
    Each run directory is finished like a `simulate` run (metrics.csv, summary.csv). Each configuration
    is resolved here, once (`resolve`); the server checks nothing again.
    """
    groups = [(resolve(cfg).cfg, run) for cfg, run in groups]
    first = groups[0][0]
    n_sites = 0
    for cfg, run in groups:
        if cfg.data != first.data or cfg.federated.clients_per_site != first.federated.clients_per_site:
            raise ValueError("simulate_groups: every configuration must share [data] and clients_per_site")
        run.write_config(cfg)
        n_sites = len(load_and_record_sites(cfg, run))
    extras = serve_groups(groups, n_sites * first.federated.clients_per_site)
    for (cfg, run), ex in zip(groups, extras, strict=True):
        finish_run(cfg, run, ex)
