"""Diagnostics on a run's checkpoints: `python -m ted_fl.diagnose eval-bn | term-grads RUN_DIR`.

The command line of ted_fl.run.diagnostics (whose docstring says what each measures)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ted_fl.config import TeacherMode, choices
from ted_fl.continual.approaches import get_approach
from ted_fl.errors import exit_code
from ted_fl.run.diagnostics import MODES, eval_bn, recorded_pull, run_approaches, summarize_modes, term_grads
from ted_fl.run.directory import RunDir, atomic_write_bytes
from ted_fl.run.markdown import md_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ted_fl.diagnose", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("eval-bn", help="rescore a run's stage checkpoints under eval.bn running and batch")
    b.add_argument("run", metavar="RUN_DIR")
    b.add_argument("--approach", default="seq")
    b.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    g = sub.add_parser("term-grads", help="each TED term's gradient norm against the segmentation loss's")
    g.add_argument("run", metavar="RUN_DIR")
    g.add_argument("--approach", nargs="+", default=None,
                   help="whose stage checkpoints, each measured on its own (default: every approach of the run)")
    g.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    g.add_argument("--stage", type=int, default=0, help="the teacher's stage; the student is the next (default 0)")
    g.add_argument("--batches", type=int, default=6)
    args = p.parse_args(argv)
    if args.cmd == "term-grads":
        return exit_code(lambda: _term_grads_command(args))
    return exit_code(lambda: _eval_bn_command(args))


def _term_grads_command(args: argparse.Namespace) -> int:
    run = RunDir.open(args.run)
    cfg = run.read_config()
    seed = args.seed if args.seed is not None else cfg.seeds[0]
    for n, approach in enumerate(run_approaches(run, args.approach, seed, args.stage)):
        if n:
            print()
        df = term_grads(run, approach, seed, args.stage, args.batches)
        table = df.pivot(index="quantity", columns="teacher_mode", values="value")
        modes = list(choices(TeacherMode))
        table = table.reindex(df["quantity"].drop_duplicates())[modes].reset_index()
        table.columns = ["quantity", *(f"end of stage, teacher {m}" for m in modes)]
        print(f"### {approach}: its own checkpoints (teacher stage{args.stage}, student stage{args.stage + 1}), seed {seed}")
        print()
        print(md_table(table))
        print(f"term-grads: {approach} seed {seed}, teacher = {approach}'s stage {args.stage}, student = {approach}'s "
              f"stage {args.stage + 1}, lambda_d {cfg.loss.lambda_d}, batch {cfg.train.batch_size} (rows kd..akt_gugf_sample: "
              "lambda_d * |grad| / |grad L_seg| at the END of the stage, an upper bound of the pull during it)")
        pull = recorded_pull(run, approach, seed, args.stage + 1)
        if get_approach(approach, cfg.loss).term_names == ["seg"]:
            print(f"pull during stage {args.stage + 1}: {approach} trains L_seg alone (no distillation term pulls); "
                  "the table above is what the terms WOULD pull at its checkpoints")
        elif pull.empty:
            print(f"pull during stage {args.stage + 1}: not recorded by this run; rerun it with "
                  "--set diagnostics.term_grads=true to record each term's gradient ratio at every step")
        else:
            print()
            print(md_table(pull.rename(columns={"value": f"mean over stage {args.stage + 1}'s training steps"}), digits=4))
            print(f"pull during stage {args.stage + 1} as {approach} trained (diagnostics.term_grads): grad_ratio_<term> = "
                  "|grad of the weighted term| / |grad L_seg|, the mean over the stage's steps; grad_seg = |grad L_seg|")
    return 0


def _eval_bn_command(args: argparse.Namespace) -> int:
    run = RunDir.open(args.run)
    seed = args.seed if args.seed is not None else run.read_config().seeds[0]
    df = eval_bn(run, args.approach, seed)
    out = Path(run.path) / "diagnostics" / f"eval_bn-{args.approach}-seed{seed}.csv"
    atomic_write_bytes(out, df.to_csv(index=False).encode())
    last = df[df["stage"] == df["stage"].max()].pivot(index="site", columns="mode", values="value")
    last = last.reindex(df["site"].drop_duplicates()).reset_index()
    print(md_table(last[["site", *MODES]]))
    print()
    print(md_table(summarize_modes(df)))
    print(f"eval-bn: {args.approach} seed {seed} ({out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
