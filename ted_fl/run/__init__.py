"""A run's files and processes: the run directory (its one writer and reader), the report and
results pages generated from run directories, diagnostics on checkpoints, Markdown and process
hygiene. It reads and writes run directories; it never runs a schedule (that is `ted_fl.schedule`).
"""
