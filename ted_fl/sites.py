"""`python -m ted_fl.sites`: list the site sets and check that a set's data loads, before a long run.

The documented name of `python -m ted_fl.sites`; the command lives in `ted_fl.commands.sites`.
"""

from ted_fl.commands.sites import main

if __name__ == "__main__":
    raise SystemExit(main())
