"""Diagnostics on a run's checkpoints: `python -m ted_fl.diagnose eval-bn | term-grads RUN_DIR`.

The documented name of `python -m ted_fl.diagnose`; the command lives in `ted_fl.commands.diagnose`.
"""

from ted_fl.commands.diagnose import main

if __name__ == "__main__":
    raise SystemExit(main())
