"""`python -m ted_fl.generalize`: single-source domain generalisation by distillation (GKD), federated.

The documented name of `python -m ted_fl.generalize`; the command lives in `ted_fl.commands.generalize`.
"""

from ted_fl.commands.generalize import main

if __name__ == "__main__":
    raise SystemExit(main())
