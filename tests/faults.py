"""Test-only fault injection: a Flower mod on a ClientApp that runs the production handlers.

The production ClientApp (`ted_fl.federated.client_app:app`) knows nothing of faults and no
production message carries them. A test runs this app instead with
`--set federated.client_app='"tests.faults:app"'` and names the fault in the environment
(inherited by the Ray workers): TED_FL_INJECT_FAULT="SITE:ROUND:MODE:TIMES", MODE one of
raise (the handler raises), hang (no reply within federated.timeout) or leak (the reply carries
two of the site's images, which the privacy audit mod, outside this one, must stop).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from ted_fl.federated import client_app as production
from ted_fl.federated import messages as M
from ted_fl.federated.message_log import audit_mod

FAULT_ENV = "TED_FL_INJECT_FAULT"


def _due(spec: str, msg: Message, context: Context) -> str:
    """The fault's mode when this message is hit ('' otherwise); counted on the site's disk
    because a failed call's context.state changes are discarded by Flower."""
    f_site, f_round, mode, times = spec.split(":")
    cfg = production._config(context, msg.content)
    site, _ = production.identity(context, cfg)
    c = dict(msg.content[M.CONFIG])
    if f_site != site or int(f_round) != int(c["round"]):
        return ""
    marker_dir = Path(str(c.get("client_state_dir", "") or "/tmp/ted-fl-faults")) / "faults"
    marker_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{c['approach']}-{c['seed']}-{c['stage']}-{c['round']}-{site}"
    seen = len(list(marker_dir.glob(f"{stem}.*")))
    if seen >= int(times):
        return ""
    (marker_dir / f"{stem}.{seen}").touch()
    return mode


def fault_mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 (Flower's ClientAppCallable)
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or msg.metadata.message_type != "train":
        return call_next(msg, context)
    mode = _due(spec, msg, context)
    if mode == "hang":
        time.sleep(production._config(context, msg.content).federated.timeout + 5)
    if mode in ("raise", "hang"):
        raise RuntimeError(f"injected fault at round {msg.content[M.CONFIG]['round']}")
    reply = call_next(msg, context)
    if mode == "leak":
        cfg = production._config(context, msg.content)
        _, share = production.site_data(cfg, *production.identity(context, cfg))
        reply.content[M.WEIGHTS]["leak"] = Array(np.ascontiguousarray(share.images[:2]))
    return reply


# The audit wraps the fault, so it inspects the reply the fault produced (as it would a real one).
app = ClientApp(mods=[audit_mod, production.secure_mod, production.privacy_mod, fault_mod])  # production's, then the fault
app.query("hello")(production.hello)
app.train()(production.train)
app.evaluate()(production.evaluate)
app.query("importance")(production.importance)
app.query("leakage")(production.leakage)
