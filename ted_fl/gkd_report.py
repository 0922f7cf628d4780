"""The GKD section of the results page: `python -m ted_fl.gkd_report RUN_DIR [--doc docs/results-gkd.md]`.

The documented name of `python -m ted_fl.gkd_report`; the command lives in `ted_fl.commands.gkd_report`.
"""

from ted_fl.commands.gkd_report import main

if __name__ == "__main__":
    raise SystemExit(main())
