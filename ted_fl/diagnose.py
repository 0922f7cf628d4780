"""Where does the forgetting live? `python -m ted_fl.diagnose bn-stats RUN_DIR [--approach A]`.

With batch norm, a model's running statistics follow the newest site. This re-estimates them on
each site's own training images (a cumulative average over one pass, no gradient, weights
untouched) before scoring that site's test split, beside the score with the final statistics.
If Dice comes back, the weights still hold the site and the forgetting sits in the statistics,
which no loss term reaches. Reads the run directory (config, last stage checkpoint) and the
researcher's copy of the data; writes `diagnostics/bn_stats-<approach>-seed<k>.csv` there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.continual.learner import evaluate
from ted_fl.continual.networks import build_model
from ted_fl.continual.weights import load_weights
from ted_fl.data import load_sites
from ted_fl.errors import TedFlError, exit_code
from ted_fl.markdown import md_table
from ted_fl.results import RunDir, atomic_write_bytes


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.nn.Module:
    """Replace every batch-norm running mean/var by the cumulative average over `images`."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        raise TedFlError("the run's model has no batch norm (model.norm); nothing to re-estimate")
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    model.train()
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size])
    return model.eval()


def bn_stats(run: RunDir, approach: str, seed: int) -> pd.DataFrame:
    """Per site: test Dice after the last stage with the final statistics, and with its own."""
    cfg = run.read_config()
    sites = load_sites(cfg.data, cfg.data.split_seed)
    last = run.load_checkpoint(approach, seed, f"stage{len(sites) - 1}")
    if last is None:
        raise TedFlError(f"{run.path}: no final stage checkpoint for {approach} seed {seed}; "
                         f"pick one of: {', '.join(cfg.approaches)}")
    rows = []
    for site in sites:
        model = load_weights(build_model(cfg.model), last["weights"]).eval()
        final = evaluate(model, site.test, per_volume=site.per_volume, labels=site.labels.labels())["dice"]
        reestimate_bn(model, torch.as_tensor(site.train.images, dtype=torch.float32))
        own = evaluate(model, site.test, per_volume=site.per_volume, labels=site.labels.labels())["dice"]
        rows.append({"site": site.name, "dice_final_stats": final, "dice_own_stats": own,
                     "recovered": own - final})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ted_fl.diagnose", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bn-stats", help="re-estimate batch-norm statistics per site after the last stage")
    b.add_argument("run", metavar="RUN_DIR")
    b.add_argument("--approach", default="seq")
    b.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    args = p.parse_args(argv)
    return exit_code(lambda: _bn_stats_command(args))


def _bn_stats_command(args: argparse.Namespace) -> int:
    run = RunDir.open(args.run)
    seed = args.seed if args.seed is not None else run.read_config().seeds[0]
    df = bn_stats(run, args.approach, seed)
    out = Path(run.path) / "diagnostics" / f"bn_stats-{args.approach}-seed{seed}.csv"
    atomic_write_bytes(out, df.to_csv(index=False).encode())
    print(md_table(df))
    print(f"bn-stats: mean test Dice {df['dice_final_stats'].mean():.3f} with the final statistics, "
          f"{df['dice_own_stats'].mean():.3f} with each site's own ({out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
