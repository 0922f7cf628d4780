"""`python -m ted_fl.networks`: every registered network with its parameters, MACs and CPU latency.

MACs come from `ted_fl.continual.profiling` (forward hooks on conv and linear layers); latency is
the CPU time of a single-threaded single-image forward (the fastest of a few), which a
shared machine's load does not inflate the way it inflates wall time.
"""

from __future__ import annotations

import argparse
import sys

from ted_fl.errors import TedFlError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ted_fl.networks", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256, the spec's)")
    parser.add_argument("--names", nargs="*", default=None, help="networks to show (default: all registered)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per network (the fastest is shown)")
    args = parser.parse_args(argv)
    # torch loads after --help (a fast answer)
    from ted_fl.continual.networks import NETWORKS
    from ted_fl.continual.profiling import profile_table

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
