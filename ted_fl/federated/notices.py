"""Two start-up notices every run printed, silenced at their source, each by its exact text.

- Flower logs a "DEPRECATED FEATURE" banner whenever `flwr.simulation.run_simulation` is called.
  It is the only public API of Flower 1.41 that runs a simulation inside this process (its
  successor, `flwr run`, submits to a SuperLink, which `python -m ted_fl.simulate` must not need;
  `run_simulation_process` is the SuperLink's own entry point), so the banner tells a user nothing
  they can act on. A filter on Flower's logger drops that one record; every other Flower
  warning, deprecations included, still shows.
- Ray's driver warns (FutureWarning) at `ray.init` that a future Ray will stop hiding GPUs from
  tasks that ask for none. Setting RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, its suggested switch,
  would change that behaviour now (a 0-GPU client would see every GPU), so only the message is
  filtered, by its text; other FutureWarnings still show.

`silence()` is idempotent and process-wide (logging filters and warnings filters are): it is
called by the in-process simulation before Flower starts, and when the ClientApp module loads,
which under `flwr run` happens in `flwr-simulation` before Flower's Ray backend calls `ray.init`.
"""

from __future__ import annotations

import logging
import warnings

RUN_SIMULATION_BANNER = "`run_simulation` function is deprecated"
RAY_ACCEL_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"


class _DropRunSimulationBanner(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "DEPRECATED FEATURE" not in text:
            return True
        return RUN_SIMULATION_BANNER not in " ".join(str(a) for a in (record.args or ()) if isinstance(a, str)) \
            and RUN_SIMULATION_BANNER not in text


_FILTER = _DropRunSimulationBanner()


def silence() -> None:
    """Drop Flower's `run_simulation` deprecation banner and Ray's accelerator FutureWarning."""
    logger = logging.getLogger("flwr")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=RAY_ACCEL_TIP, category=FutureWarning)
