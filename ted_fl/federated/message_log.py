"""A Flower client mod that audits every message leaving a client: privacy is checked, not assumed.

A reply may carry only (a) arrays shaped like the model the server sent (weights, or parameter
importances of the same shapes), (b) metrics, (c) the hello reply's identity counts, and (d) a "stats" record of 1-D summed
statistics whose lengths the request declares (`stats_lengths` in its config: FSD's sums; checked
by shape only, so a client could still hide data in them: the audit bounds, it does not prove). An array
whose trailing dimensions are an image's (H, W), a ConfigRecord with other keys, or an array of
another shape is a violation: the mod replaces the reply with an error naming it, so the server
reports the site instead of receiving its data. Under privacy.secagg (ted_fl.federated.secagg) a train
reply is Flower's SecAgg+ protocol: its config record may hold only the protocol's reply keys, its masked
vector only the model's float shapes (after Flower's one-value weight factor), and the emptied FitRes
layout scalars.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from ted_fl.federated import messages as M

AUDIT_ERROR_CODE = 4031
# What a SecAgg+ client sends back (flwr.client.mod.secaggplus_mod): public keys, encrypted key shares for
# its neighbours, the masked vector, and the shares of the unmasking stage; and the FitRes layout's scalars.
SECAGG_REPLY_KEYS = frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                               Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST})
FITRES_SCALARS = {"fitres.status": frozenset({"code", "message"}), "fitres.metrics": None}


def secagg_violations(name: str, rec: ConfigRecord, allowed_shapes: set[tuple[int, ...]]) -> list[str] | None:
    """A SecAgg+ reply's config records (None: not one): protocol keys only, masked vectors of model shapes."""
    if name in FITRES_SCALARS:
        keys = FITRES_SCALARS[name]
        bad = sorted(k for k, v in rec.items() if (keys is not None and k not in keys)
                     or (keys is None and not isinstance(v, (int, float))))
        return [f"config record '{name}' with keys {bad}"] if bad else []
    if name != RECORD_KEY_CONFIGS:
        return None
    found = [f"config record '{name}' with keys {sorted(set(rec.keys()) - SECAGG_REPLY_KEYS)}"] \
        if set(rec.keys()) - SECAGG_REPLY_KEYS else []
    masked = [tuple(bytes_to_ndarray(b).shape) for b in rec.get(Key.MASKED_PARAMETERS, [])]  # type: ignore[union-attr]
    if masked and (masked[0] != (1,) or any(s not in allowed_shapes for s in masked[1:])):
        found.append(f"masked vector of shapes {masked[1:]} is not the model's")
    return found


def violations(reply: Message, request: Message, image_hw: tuple[int, int] | None) -> list[str]:
    """Everything in `reply` that is neither model-shaped arrays, metrics nor identity counts."""
    if not reply.has_content():
        return []
    allowed_shapes: set[tuple[int, ...]] = set()
    if request.has_content() and M.WEIGHTS in request.content:
        for arr in request.content[M.WEIGHTS].values():
            allowed_shapes.add(tuple(arr.shape))
    stats_lengths: set[int] = set()
    if request.has_content() and M.CONFIG in request.content:
        stats_lengths = {int(n) for n in request.content[M.CONFIG].get("stats_lengths", [])}  # type: ignore[union-attr]
    found: list[str] = []
    for name, rec in reply.content.items():
        if isinstance(rec, ArrayRecord) and name == M.STATS:
            for key, arr in rec.items():
                if len(arr.shape) != 1 or int(arr.shape[0]) not in stats_lengths:
                    found.append(f"array '{name}/{key}' of shape {tuple(arr.shape)} is not a declared sum")
            continue
        if isinstance(rec, MetricRecord):
            continue
        if isinstance(rec, ConfigRecord) and (secagg := secagg_violations(name, rec, allowed_shapes)) is not None:
            found.extend(secagg)
            continue
        if isinstance(rec, ArrayRecord) and name == "fitres.parameters" and not len(rec):
            continue  # emptied by secaggplus_mod: the update left masked, in the config record
        if isinstance(rec, ConfigRecord):
            extra = set(rec.keys()) - M.IDENTITY_KEYS
            if name != M.IDENTITY or extra:
                found.append(f"config record '{name}' with keys {sorted(extra) or sorted(rec.keys())}")
            continue
        if isinstance(rec, ArrayRecord):
            if name not in (M.WEIGHTS, M.AUX):
                found.append(f"array record '{name}'")
            for key, arr in rec.items():
                shape = tuple(arr.shape)
                if image_hw and len(shape) >= 2 and shape[-2:] == image_hw:
                    found.append(f"array '{name}/{key}' shaped like the site's images {shape}")
                elif shape not in allowed_shapes:
                    found.append(f"array '{name}/{key}' of shape {shape} is not a model tensor")
            continue
        found.append(f"record '{name}' of type {type(rec).__name__}")
    return found


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    hw = None
    if "identity_hw" in context.state:
        hw = tuple(int(x) for x in context.state["identity_hw"]["hw"])  # type: ignore[union-attr]
    elif reply.has_content() and M.IDENTITY in reply.content:
        shape = list(reply.content[M.IDENTITY]["image_shape"])  # type: ignore[arg-type]
        context.state["identity_hw"] = ConfigRecord({"hw": [int(shape[-2]), int(shape[-1])]})
        hw = (int(shape[-2]), int(shape[-1]))
    found = violations(reply, msg, hw)  # type: ignore[arg-type]
    if found:
        return Message(Error(code=AUDIT_ERROR_CODE, reason="privacy audit: " + "; ".join(found)),
                       reply_to=msg)
    return reply


def record_message(audit: dict[str, dict[str, Any]], site: str, kind: str, direction: str,
                   content: RecordDict) -> None:
    """Add one message to the server's audit log: per (site, kind, direction, record) the number
    of messages, their payload bytes and every array's name, shape and dtype (config and metric
    records: their keys). `ted_fl.privacy.leakage` turns the log into audit.csv."""
    for name, rec in content.items():
        key = f"{site}|{kind}|{direction}|{name}"
        entry = audit.setdefault(key, {"site": site, "kind": kind, "direction": direction, "record": name,
                                       "type": type(rec).__name__, "messages": 0, "bytes": 0, "arrays": {}})
        entry["messages"] += 1
        entry["bytes"] += int(rec.count_bytes())
        if isinstance(rec, ArrayRecord):
            for k, arr in rec.items():
                entry["arrays"][k] = [list(int(x) for x in arr.shape), str(arr.dtype)]
        else:
            for k in rec:
                entry["arrays"][k] = [[], "scalar"]
