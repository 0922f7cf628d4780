"""Does SecAgg+ (flwr 1.41) work with a Message-API ServerApp and strategy? The two attempts of docs/privacy.md.

    python docs/secagg_probe.py strategy   # Message-API FedAvg, secaggplus_mod on the clients
    python docs/secagg_probe.py workflow   # SecAggPlusWorkflow called from a Message-API main

Each prints one `RESULT ...` line (3 simulated SuperNodes, one round of a 4-float model).
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

MODES = ("strategy", "workflow")
client = ClientApp(mods=[secaggplus_mod])
server = ServerApp()
MODE = sys.argv[1] if len(sys.argv) > 1 else ""


@client.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    new = ArrayRecord([a + 1.0 for a in arrays.to_numpy_ndarrays()])
    return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    init = ArrayRecord([np.zeros(4, dtype=np.float32)])
    if MODE == "strategy":  # attempt 1: the Message-API strategy, secaggplus_mod on the client
        res = FedAvg(fraction_train=1.0, fraction_evaluate=0.0).start(grid=grid, initial_arrays=init, num_rounds=1)
        print("RESULT strategy", res.arrays.to_numpy_ndarrays() if res.arrays else None)
        return
    # attempt 2: SecAggPlusWorkflow (legacy path) called from a Message-API main with a Message-API strategy
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow

    try:
        lc = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=FedAvg())
        SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)(grid, lc)
        print("RESULT workflow ok")
    except Exception as e:  # the finding is the exception: print it, do not hide it
        traceback.print_exc()
        print("RESULT workflow", type(e).__name__, e)


if __name__ == "__main__":
    if MODE not in MODES:
        print(f"usage: python docs/secagg_probe.py {'|'.join(MODES)} (got {MODE!r})", file=sys.stderr)
        sys.exit(2)
    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
