"""The main job: federated domain-continual simulation on Flower + Ray.

    python -m ted_fl.simulate --sites prostate

Each site is a Flower client that arrives in turn; its images never leave it. See README.md.
"""

from __future__ import annotations

from ted_fl.commands.shared import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("simulate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
