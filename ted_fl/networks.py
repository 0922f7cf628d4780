"""`python -m ted_fl.networks`: every registered network with its parameters, MACs and CPU latency.

The documented name of `python -m ted_fl.networks`; the command lives in `ted_fl.commands.networks`.
"""

from ted_fl.commands.networks import main

if __name__ == "__main__":
    raise SystemExit(main())
