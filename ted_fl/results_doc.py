"""Write a Markdown results page from run directories: `python -m ted_fl.results_doc RUN_DIR ... --out FILE`.

The documented name of `python -m ted_fl.results_doc`; the command lives in `ted_fl.commands.results_doc`.
"""

from ted_fl.commands.results_doc import main

if __name__ == "__main__":
    raise SystemExit(main())
