"""`python -m ted_fl.networks`: every registered network with its parameters, MACs and CPU latency.

MACs come from `ted_fl.continual.profiling` (forward hooks on conv and linear layers); latency is
the CPU time of a single-threaded single-image forward (the fastest of a few), which a
shared machine's load does not inflate the way it inflates wall time.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd
import torch

from ted_fl.config import ModelConfig
from ted_fl.errors import TedFlError, unknown


def profile_table(names: list[str], size: int, repeats: int = 5, latency: bool = True) -> pd.DataFrame:
    """One row per network: params, MACs (G) and CPU latency (ms) per image at size x size."""
    from ted_fl.continual.networks import NETWORKS, build_model
    from ted_fl.continual.profiling import count_macs, latency_ms, param_count

    rows = []
    for name in names:
        if name not in NETWORKS:
            raise unknown("network", name, NETWORKS, "--names")
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, out_channels=2))  # a binary head, as the GKD protocol
        shape = (1, size, size)
        try:
            macs = count_macs(model, shape)
        except RuntimeError as exc:
            raise TedFlError(f"network '{name}' does not take {size} x {size} images ({exc}); "
                             "pick a --size that is a multiple of 32") from None
        rows.append({"network": name, "params_M": param_count(model) / 1e6, "GMACs": macs / 1e9,
                     "latency_ms": latency_ms(model, shape, repeats) if latency else float("nan")})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    from ted_fl.continual.networks import NETWORKS

    parser = argparse.ArgumentParser(prog="python -m ted_fl.networks", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256, the spec's)")
    parser.add_argument("--names", nargs="*", default=None, help="networks to show (default: all registered)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per network (the fastest is shown)")
    args = parser.parse_args(argv)
    try:
        if args.size < 32:
            raise TedFlError(f"--size must be >= 32, got {args.size}")
        table = profile_table(args.names or sorted(NETWORKS), args.size, args.repeats)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"size {args.size} x {args.size}, 1 channel; latency = CPU time of a single-threaded forward")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
