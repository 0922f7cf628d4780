"""How much does the evaluation's batch norm decide? `python -m ted_fl.diagnose eval-bn RUN_DIR [--approach A]`.

Rescores every stage checkpoint of one approach and seed on every site's test split under both
`eval.bn` modes: "running" (model.eval(): the running statistics, which follow the newest site)
and "batch" (the reference's protocol: each image alone, normalised by its own statistics). The
run's own protocol options (rescale, HD95) are kept; only eval.bn changes. Prints the final
Dice per site and the Avg / BWT / forgetting of each mode's R matrix. Reads the run directory
(config, stage checkpoints) and the researcher's copy of the data; writes
`diagnostics/eval_bn-<approach>-seed<k>.csv` (mode, stage, site, dice) there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from ted_fl.continual.learner import eval_options, evaluate
from ted_fl.continual.metrics import continual_summary, r_matrix
from ted_fl.continual.networks import build_model
from ted_fl.continual.weights import load_weights
from ted_fl.data import load_sites
from ted_fl.errors import TedFlError, exit_code
from ted_fl.markdown import md_table
from ted_fl.results import RunDir, atomic_write_bytes

MODES = ("running", "batch")


def eval_bn(run: RunDir, approach: str, seed: int) -> pd.DataFrame:
    """Rows (mode, stage, stage_site, site, dice): every stage checkpoint scored under both modes."""
    cfg = run.read_config()
    sites = load_sites(cfg.data, cfg.data.split_seed)
    rows = []
    for stage, stage_site in enumerate(s.name for s in sites):
        ckpt = run.load_checkpoint(approach, seed, f"stage{stage}")
        if ckpt is None:
            raise TedFlError(f"{run.path}: no stage{stage} checkpoint for {approach} seed {seed}; "
                             f"pick one of: {', '.join(cfg.approaches)}")
        model = load_weights(build_model(cfg.model), ckpt["weights"])
        for mode in MODES:
            opts = {**eval_options(cfg), "bn": mode}
            for site in sites:
                dice = evaluate(model, site.test, per_volume=site.per_volume, labels=site.labels.labels(),
                                **opts)["dice"]  # type: ignore[arg-type]
                rows.append({"mode": mode, "stage": stage, "stage_site": stage_site, "site": site.name,
                             "metric": "dice", "value": dice})
    return pd.DataFrame(rows)


def summarize_modes(df: pd.DataFrame) -> pd.DataFrame:
    """Avg, BWT, forgetting and plasticity of each mode's R matrix."""
    out = []
    for mode in MODES:
        s = continual_summary(r_matrix(df[df["mode"] == mode], "dice"))
        out.append({"eval.bn": mode, **{k: s[k] for k in ("avg", "bwt", "forgetting", "plasticity")}})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ted_fl.diagnose", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("eval-bn", help="rescore a run's stage checkpoints under eval.bn running and batch")
    b.add_argument("run", metavar="RUN_DIR")
    b.add_argument("--approach", default="seq")
    b.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    args = p.parse_args(argv)
    return exit_code(lambda: _eval_bn_command(args))


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
