"""The centralized reference run: the same schedule, step and evaluation as the simulator, in one process.

The documented name of `python -m ted_fl.centralized`; the command lives in `ted_fl.commands.centralized`.
"""

from ted_fl.commands.centralized import main

if __name__ == "__main__":
    raise SystemExit(main())
