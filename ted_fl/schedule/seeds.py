"""Seed derivation shared by the schedule, the orders and the sites (a module of its own so that the
site worker and the orders can use it without importing the schedule's loop)."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A stable 31-bit seed from (seed, stage, round, client...): every draw is reproducible."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0] >> 1)
