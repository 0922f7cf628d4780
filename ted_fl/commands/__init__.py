"""The command lines: argparse and `main` of every `python -m ted_fl.X` (the top-level `ted_fl/X.py`
files are their documented names). Nothing below imports this package.
"""
