"""What travels in a Flower message, and how many bytes it takes.

Down (server -> client): model weights, once per stage the frozen teacher (and any parameter
importances), the SKA probes (pixels, or the seed they are regenerated from), and a ConfigRecord
of scalars. Up (client -> server): weights, the number of examples, and metrics. Nothing else:
`ted_fl.federated.message_log` enforces it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ted_fl.continual.weights import Weights

WEIGHTS = "weights"
TEACHER = "teacher"
AUX = "aux"
PROBES = "probes"
CONFIG = "config"
METRICS = "metrics"
VAL = "val"
IDENTITY = "identity"
REFERENCE = "reference"  # the membership-inference reference model (ted_fl.privacy.mia), down only
STATS = "stats"  # summed statistics (FSD's n, sum z, sum z z^T as 1-D arrays): never a per-image vector

# Keys a client may put in the identity ConfigRecord of its hello reply: counts and names, no data.
IDENTITY_KEYS = frozenset({"site", "client", "partition", "n_train", "n_val", "n_test", "image_shape"})


def to_record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> Weights:
    return {k: record[k].numpy() for k in record}


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's records (arrays, configs, metrics)."""
    total = 0
    for rec in content.values():
        total += rec.count_bytes()
    return total


def metric_record(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def _plain(v: object) -> object:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def config_record(values: dict) -> ConfigRecord:
    """A ConfigRecord from scalars (numpy scalars converted: Flower accepts Python types only)."""
    # Empty strings are left out: Flower 1.41's ConfigRecord.count_bytes rejects them.
    return ConfigRecord({k: _plain(v) for k, v in values.items() if v != "" and v is not None})
