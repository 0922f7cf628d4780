"""Privacy studies: the privacy-utility grid over epsilon and the privacy policies.

The documented name of `python -m ted_fl.study`; the command lives in `ted_fl.commands.study`.
"""

from ted_fl.commands.study import main

if __name__ == "__main__":
    raise SystemExit(main())
