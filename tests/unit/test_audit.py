"""The privacy audit mod: a reply may carry model-shaped arrays and metrics, nothing else."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from ted_fl.federated import messages as M
from ted_fl.federated.message_log import AUDIT_ERROR_CODE, audit_mod, violations

# Messages built outside a running app need a task identity (as inside a SuperLink).
TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

W = {"conv.weight": np.zeros((4, 1, 3, 3), np.float32), "conv.bias": np.zeros(4, np.float32)}


def request() -> Message:
    return Message(RecordDict({M.WEIGHTS: M.to_record(W)}), dst_node_id=1, message_type="train")


def context() -> Context:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    ctx.state["identity_hw"] = ConfigRecord({"hw": [32, 32]})
    return ctx


def reply_with(content: RecordDict) -> Message:
    return Message(content, dst_node_id=0, message_type="train")


def test_model_arrays_and_metrics_pass() -> None:
    reply = reply_with(RecordDict({M.WEIGHTS: M.to_record(W), M.METRICS: MetricRecord({"loss": 0.1})}))
    assert violations(reply, request(), (32, 32)) == []


def test_image_shaped_array_is_caught() -> None:
    leak = ArrayRecord({"conv.weight": Array(np.zeros((4, 1, 32, 32), np.float32))})
    found = violations(reply_with(RecordDict({M.WEIGHTS: leak})), request(), (32, 32))
    assert found and "shaped like the site's images" in found[0]


def test_foreign_records_are_caught() -> None:
    reply = reply_with(RecordDict({
        "images": ArrayRecord({"x": Array(np.zeros(5, np.float32))}),
        "notes": ConfigRecord({"path": "/data/case01.nii.gz"}),
    }))
    found = violations(reply, request(), (32, 32))
    assert any("array record 'images'" in f for f in found)
    assert any("config record 'notes'" in f for f in found)


def test_mod_turns_a_leak_into_an_error_reply() -> None:
    req = request()

    def leaky(msg: Message, ctx: Context) -> Message:
        return reply_with(RecordDict({M.WEIGHTS: ArrayRecord({"x": Array(np.zeros((2, 32, 32), np.float32))})}))

    def clean(msg: Message, ctx: Context) -> Message:
        return reply_with(RecordDict({M.WEIGHTS: M.to_record(W)}))

    out = audit_mod(req, context(), leaky)
    assert out.has_error() and out.error.code == AUDIT_ERROR_CODE
    assert "privacy audit" in out.error.reason
    assert not audit_mod(req, context(), clean).has_error()


def test_production_client_app_carries_no_fault_injection() -> None:
    """Fault injection is a test-only mod (tests/faults.py), not part of the production app."""
    import inspect

    from ted_fl.federated import client_app, server_app

    # audit, then SecAgg+ (masks what leaves), then DP (clips before masking; issues 13, 25)
    assert client_app.app._mods == [client_app.audit_mod, client_app.secure_mod, client_app.privacy_mod]
    for module in (client_app, server_app):
        assert "inject" not in inspect.getsource(module).lower(), module.__name__
