"""The privacy policies of `[privacy]` that change what a site trains on or what travels.

`privacy.teacher` ("server" | "site") decides where the frozen teacher lives and who draws the
SKA probes; `privacy.replay` bounds what an earlier site keeps for its retention rounds. The
round's planner (`ted_fl.schedule.orders`) is their one caller: both executors carry out its orders,
so a policy gives the same numbers in the simulator and in the centralized run.
"""

from __future__ import annotations

import numpy as np

from ted_fl.config import ExperimentConfig
from ted_fl.data.types import Split

PROBE_SITE_TAG = 0x517E  # mixed into a site's own probe seed (privacy.teacher = "site")
REPLAY_TAG = 0xB0F  # mixed into a site's replay-buffer seed


def uses_replay(cfg: ExperimentConfig, site_index: int, stage: int) -> bool:
    """Whether a site trains on its replay buffer: an earlier site training in a later stage."""
    return cfg.privacy.replay > 0 and site_index < stage


def replay_buffer(split: Split, n: int, seed: int) -> Split:
    """At most `n` of the split's images, drawn without replacement by `seed` (kept in order)."""
    if n <= 0 or len(split) <= n:
        return split
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:n])
    return split.take(idx)


def replay_share(n: int, clients_per_site: int) -> int:
    """Each of a site's clients keeps at most n // k images (at least 1): at most n per site."""
    return max(1, n // max(1, clients_per_site))


def gets_teacher(cfg: ExperimentConfig, site_index: int, stage: int) -> bool:
    """Under privacy.teacher = "site" only the arriving site holds the teacher."""
    return cfg.privacy.teacher == "server" or site_index == stage
