"""The main job: federated domain-continual simulation on Flower + Ray.

The documented name of `python -m ted_fl.simulate`; the command lives in `ted_fl.commands.simulate`.
"""

from ted_fl.commands.simulate import main

if __name__ == "__main__":
    raise SystemExit(main())
