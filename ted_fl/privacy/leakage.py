"""The audit summary of a run: per message kind and site, what left it (and what reached it).

The server logs every message it sends and receives (`ted_fl.federated.message_log.record_message`,
kept in each approach and seed's checkpoint); this module turns that log into `audit.csv`, one
row per approach, seed, site, kind (train, evaluate, importance, leakage, hello), direction
("up": from the site; "down": to it) and record (weights, teacher, aux, probes, metrics, config,
...), with the messages, their payload bytes and the arrays' names and shapes, and checks that no
array shaped like an image or a mask ever went up: `image_shaped` counts arrays whose trailing
dimensions are the images' (H, W) (the privacy audit mod already refuses such replies; this
proves, after the fact, that none arrived).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

COLUMNS = ["approach", "seed", "site", "kind", "direction", "record", "type", "messages", "bytes",
           "arrays", "shapes", "names", "image_shaped"]


def audit_frame(logs: dict[tuple[str, int], list[dict[str, dict[str, Any]]]], image_hw: tuple[int, int]
                ) -> pd.DataFrame:
    """`logs[(approach, seed)]`: the server's audit dicts (record_message's) for that run."""
    rows = []
    for (approach, seed), parts in logs.items():
        for log in parts:
            for e in log.values():
                shapes = {name: tuple(shape) for name, (shape, _dtype) in e["arrays"].items()}
                distinct = sorted({s for s in shapes.values() if s}, key=lambda s: (len(s), s))
                image = sum(1 for s in shapes.values() if len(s) >= 2 and s[-2:] == tuple(image_hw))
                rows.append(dict(approach=approach, seed=int(seed), site=e["site"], kind=e["kind"],
                                 direction=e["direction"], record=e["record"], type=e["type"],
                                 messages=int(e["messages"]), bytes=int(e["bytes"]),
                                 arrays=sum(1 for s in shapes.values() if s) if e["type"] == "ArrayRecord" else 0,
                                 shapes=";".join("x".join(map(str, s)) for s in distinct),
                                 names=";".join(sorted(shapes)), image_shaped=int(image)))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values(["approach", "seed", "site", "kind", "direction", "record"], kind="stable",
                          ignore_index=True)


def leaks(audit: pd.DataFrame) -> pd.DataFrame:
    """Rows where an image- or mask-shaped array left a site (empty when the run kept its data)."""
    return audit[(audit["direction"] == "up") & (audit["image_shaped"] > 0)]


def by_kind(audit: pd.DataFrame) -> pd.DataFrame:
    """Bytes and messages per approach, kind, direction and record, summed over sites (seed means)."""
    if audit.empty:
        return audit
    g = audit.groupby(["approach", "seed", "kind", "direction", "record"], sort=False)[["messages", "bytes"]].sum()
    return g.groupby(["approach", "kind", "direction", "record"], sort=False).mean().reset_index()
