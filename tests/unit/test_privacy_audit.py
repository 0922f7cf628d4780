"""The audit summary: the server's message log becomes audit.csv, and an image-shaped array
that left a site is found (the audit mod stops such replies; this checks after the fact)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ted_fl.federated.message_log import record_message
from ted_fl.privacy.leakage import audit_frame, by_kind, leaks
from ted_fl.studies.privacy_utility import bytes_table, probe_findings


def _weights() -> ArrayRecord:
    return ArrayRecord({"conv.weight": Array(np.zeros((4, 1, 3, 3), np.float32)), "conv.bias": Array(np.zeros(4, np.float32))})


def test_audit_rows_per_site_kind_direction_and_record() -> None:
    log: dict = {}
    down = RecordDict({"weights": _weights(), "config": ConfigRecord({"round": 0})})
    up = RecordDict({"weights": _weights(), "metrics": MetricRecord({"total": 1.0})})
    for _ in range(3):
        record_message(log, "BMC", "train", "down", down)
        record_message(log, "BMC", "train", "up", up)
    df = audit_frame({("kd", 0): [log]}, (16, 16))
    w = df[(df["direction"] == "up") & (df["record"] == "weights")].iloc[0]
    assert w["messages"] == 3 and w["bytes"] == 3 * _weights().count_bytes() and w["arrays"] == 2
    assert w["shapes"] == "4;4x1x3x3" and w["names"] == "conv.bias;conv.weight" and w["image_shaped"] == 0
    assert set(df["record"]) == {"weights", "config", "metrics"} and leaks(df).empty
    assert by_kind(df)[lambda d: d["record"] == "weights"]["bytes"].tolist() == [3 * _weights().count_bytes()] * 2


def test_an_image_shaped_array_going_up_is_a_leak_but_probes_going_down_are_not() -> None:
    log: dict = {}
    record_message(log, "BMC", "train", "down", RecordDict({"probes": ArrayRecord({"probes": Array(np.zeros((2, 1, 16, 16), np.float32))})}))
    assert leaks(audit_frame({("ted", 0): [log]}, (16, 16))).empty
    record_message(log, "BMC", "train", "up", RecordDict({"aux": ArrayRecord({"x": Array(np.zeros((1, 16, 16), np.float32))})}))
    bad = leaks(audit_frame({("ted", 0): [log]}, (16, 16)))
    assert len(bad) == 1 and bad.iloc[0]["site"] == "BMC" and bad.iloc[0]["record"] == "aux"


def test_bytes_table_and_probe_findings_come_from_the_audit() -> None:
    rows = []
    for approach, probes, teacher in (("kd", 0, 100), ("ted_gugf", 2_000_000, 100)):
        for record, direction, b in (("weights", "down", 1_000_000), ("teacher", "down", teacher),
                                     ("probes", "down", probes), ("weights", "up", 1_000_000)):
            if b:
                rows.append(dict(approach=approach, seed=0, cell=approach, site="A", kind="train",
                                 direction=direction, record=record, messages=1, bytes=b))
    bt = bytes_table(pd.DataFrame(rows), [])
    ted = bt[bt["approach"] == "ted_gugf"].iloc[0]
    assert ted["train down: probes"] == 2.0 and ted["total down"] == 3.0001 and ted["total up"] == 1.0
    mean = pd.DataFrame({"approach": ["kd", "ted_gugf"], "mia_auc_cal": [0.6, 0.7]})
    (line,) = probe_findings(bt, mean, [])
    assert "2.00 MB of probes" in line and "+200 %" in line and "0.700 vs kd 0.600" in line
