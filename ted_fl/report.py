"""`python -m ted_fl.report RUN_DIR [RUN_DIR ...]`: the run report's command line (the page: ted_fl.run.html_report).

The documented name of `python -m ted_fl.report`; the command lives in `ted_fl.commands.report`.
"""

from ted_fl.commands.report import main

if __name__ == "__main__":
    raise SystemExit(main())
