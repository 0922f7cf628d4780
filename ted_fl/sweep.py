"""Run a grid of independent simulations in parallel and report across them.

The documented name of `python -m ted_fl.sweep`; the command lives in `ted_fl.commands.sweep`.
"""

from ted_fl.commands.sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
