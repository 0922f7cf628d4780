"""The centralized reference run: the same schedule, step and evaluation as the simulator, in one process.

    python -m ted_fl.centralized --sites prostate --approach seq ted_gugf --config simulations/quick.toml

It is the correctness reference (the federated simulator must reproduce its R matrix) and the
bare loop against which the simulator's overhead is measured. The executor is `ted_fl.schedule.in_process`.
"""

from __future__ import annotations

from ted_fl.commands.shared import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("centralized", argv)


if __name__ == "__main__":
    raise SystemExit(main())
