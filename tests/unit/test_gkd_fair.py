"""The fair GKD rows (gkd-method.md 2.3-2.5, revised): DICD's teacher in one normalisation mode, the
alignment networks fitted in the mode they are used in, DCGD codes centred by the batch mean with
each graph's entropy recorded, L_seg on the anchors only, and kd_aug (kd on the same views)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.config import LossConfig, ModelConfig
from ted_fl.continual import gkd as G
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach, WeightedTerm
from ted_fl.continual.device import batch_statistics
from ted_fl.continual.networks import build_model
from ted_fl.continual.step import train_step
from ted_fl.data.types import Split

TINY_TEACHER = ModelConfig(name="basic_unet", channels=[4, 4, 8, 8, 16, 4], out_channels=2)


class IdentityMSAN(nn.Module):
    """A perfectly aligned MSAN: H(E(f)) = f (the code is the bottleneck itself)."""

    dim = 0

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return z


def _teacher_with_running_stats() -> nn.Module:
    """A teacher whose running statistics differ from any batch's (so eval and train modes differ)."""
    torch.manual_seed(0)
    teacher = build_model(TINY_TEACHER)
    for m in teacher.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.5)
    return teacher


def _step(appr: Approach, teacher: nn.Module, student: nn.Module, x: torch.Tensor, y: torch.Tensor,
          n_anchors: int | None = None) -> dict[str, float]:
    return train_step(student, teacher, appr, x, y, torch.optim.SGD(student.parameters(), lr=0.0), n_anchors=n_anchors)


def test_a_perfectly_aligned_msan_gives_a_zero_teacher_side_cross_loss() -> None:
    teacher = _teacher_with_running_stats()
    student = copy.deepcopy(teacher)
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 32, 32) > 0.7).long()
    appr = G.gkd_approach("cross", IdentityMSAN(), IdentityMSAN())  # type: ignore[arg-type]
    assert appr.loss_cfg.teacher_mode == G.TEACHER_MODE == "eval"
    out = _step(appr, teacher, student, x, y)
    # y_ST = Dec_T(H_T(E_T(f_T))) = y_T: the teacher's own prediction, in the same mode
    assert out["cross_st"] == pytest.approx(0.0, abs=1e-6)
    assert out["cross"] >= out["cross_st"]
    # the old code: y_T (and TAN's features) with batch statistics, the cross prediction in eval: a floor
    mixed = Approach("cross", LossConfig(teacher_mode="train"),
                     [WeightedTerm(T.SegLoss(), 1.0), WeightedTerm(G.DICD(IdentityMSAN(), IdentityMSAN(),  # type: ignore[arg-type]
                                                                         teacher_mode="eval"), 0.5)])
    assert _step(mixed, teacher, copy.deepcopy(teacher), x, y)["cross_st"] > 1e-3


def test_the_alignment_network_is_fitted_on_the_mode_it_is_used_in() -> None:
    from ted_fl.continual.gkd_stages import train_alignment

    torch.manual_seed(1)
    owner = build_model(ModelConfig(name="small_unet", out_channels=2))
    for m in owner.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.fill_(0.3)
            m.running_var.fill_(2.5)
    buffers = {k: v.clone() for k, v in owner.state_dict().items()}
    rng = np.random.default_rng(0)
    imgs = rng.random((2, 1, 32, 32)).astype(np.float32)
    split = Split(imgs, (imgs[:, 0] > 0.6).astype(np.int64), np.array(["a", "b"]))
    psae = G.PSAE((4, 4, 4, 8), side=4)
    x = torch.as_tensor(imgs)
    recon = {}
    for mode in ("eval", "batch"):
        msan = G.MSAN(G.bottleneck_shape(owner, (1, 32, 32))[0], dim=8, side=4)
        with torch.no_grad():
            owner.eval()
            with batch_statistics(owner) if mode == "batch" else torch.no_grad():
                f = owner.forward_features(x)[1]["bottleneck"]
            recon[mode] = float(torch.nn.functional.mse_loss(msan(f), f))
        metrics, _ = train_alignment(owner, msan, psae, split, steps=1, batch_size=2, crop=0, lr=0.0, seed=0, mode=mode)
        assert metrics["act_recon"] == pytest.approx(recon[mode], rel=1e-5), mode
    assert recon["eval"] != pytest.approx(recon["batch"], rel=1e-3)  # the two modes are different functions
    assert all(torch.equal(v, owner.state_dict()[k]) for k, v in buffers.items())  # no buffer touched
    with pytest.raises(Exception, match="ACT mode"):
        train_alignment(owner, msan, psae, split, steps=1, batch_size=2, crop=0, lr=0.0, seed=0, mode="train")


def _dcgd_inputs(z_s: torch.Tensor, z_t: torch.Tensor, b: int) -> T.StepInputs:
    n = z_s.shape[0]
    return T.StepInputs(logits=torch.zeros(n, 2, 2, 2), p=torch.full((n, 2, 2, 2), 0.5), masks=torch.zeros(n, 2, 2),
                        model=nn.Identity(), feats={"bottleneck": z_s}, teacher_feats={"bottleneck": z_t}, n_anchors=b)


def test_dcgd_codes_are_centred_so_a_common_offset_changes_nothing() -> None:
    g = torch.Generator().manual_seed(4)
    b, k, d = 3, 2, 6
    z_s, z_t = torch.randn(b * (k + 1), d, generator=g), torch.randn(b * (k + 1), d, generator=g)
    offset = 10.0 * torch.randn(1, d, generator=g)  # the codes' common direction (92-99 % of their energy)
    for term in (G.DCGDIntra(IdentityMSAN(), IdentityMSAN()), G.DCGDInter(IdentityMSAN(), IdentityMSAN())):  # type: ignore[arg-type]
        plain = term.compute(_dcgd_inputs(z_s, z_t, b))
        s = _dcgd_inputs(z_s + offset, z_t - offset, b)
        shifted = term.compute(s)
        assert plain is not None and shifted is not None and float(plain) > 1e-4
        assert float(shifted) == pytest.approx(float(plain), rel=1e-4), term.name
        # without centring the offset codes make a near-uniform graph; centred they do not
        e_t, e_s = s.stats[f"entropy_{term.name}_t"], s.stats[f"entropy_{term.name}_s"]
        assert max(e_t, e_s) < G.NEAR_UNIFORM and s.stats["entropy_near_uniform"] == 0.0
    raw = G.intra_matrix((z_s + offset)[:b], (z_s + offset)[b:], 0.1)
    assert G.row_entropy(raw) >= G.NEAR_UNIFORM


def test_row_entropy_and_the_near_uniform_flag() -> None:
    assert G.row_entropy(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    assert G.row_entropy(torch.eye(3)) == pytest.approx(0.0)
    q = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])  # inter graph: no self loop
    assert G.row_entropy(q, support=2) == pytest.approx(1.0)
    # identical codes: centred they vanish, every row is uniform, the step is flagged
    z = torch.ones(6, 4)
    s = _dcgd_inputs(z, z.clone(), 2)
    G.DCGDIntra(IdentityMSAN(), IdentityMSAN()).compute(s)  # type: ignore[arg-type]
    assert s.stats["entropy_intra_t"] == pytest.approx(1.0) and s.stats["entropy_near_uniform"] == 1.0


def test_dcgd_rows_train_l_seg_on_anchors_only_and_kd_aug_on_the_views_too() -> None:
    tan = san = IdentityMSAN()
    gkd = G.gkd_approach("gkd", tan, san)  # type: ignore[arg-type]
    old = G.gkd_approach("gkd", tan, san, seg_on_views=True)  # type: ignore[arg-type]
    assert gkd.term_names == ["seg", "intra", "inter", "cross"] and isinstance(gkd.terms[0].term, G.AnchorSegLoss)
    assert type(old.terms[0].term) is T.SegLoss
    assert G.gkd_approach("kd_aug").term_names == ["seg", "kd"]
    assert [n for n in G.GKD_APPROACHES if G.uses_views(n)] == ["student_aug", "kd_aug", "gkd", "intra", "inter",
                                                                "intra_inter"]
    assert G.uses_views("cross", seg_on_views=True) and not G.uses_views("cross")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 2, 4, 4, generator=g)
    masks = (torch.rand(6, 4, 4, generator=g) > 0.5).long()
    p = T.probabilities(logits)
    s = T.StepInputs(logits=logits, p=p, masks=masks, model=nn.Identity(), n_anchors=2)
    anchors = T.SegLoss()(p[:2], T.one_hot(masks[:2], 2).float())
    assert float(G.AnchorSegLoss().compute(s)) == pytest.approx(float(anchors), rel=1e-6)
    assert float(T.SegLoss().compute(s)) != pytest.approx(float(anchors), rel=1e-3)


def test_generalize_reads_the_fair_config_and_the_command_line_overrides_it() -> None:
    import argparse

    from ted_fl.commands.generalize import build_config
    from ted_fl.errors import TedFlError

    def ns(**kw: object) -> argparse.Namespace:
        base = dict(config="gkd-fair-cpu", sites=None, data_dir=None, source=None, teacher="", student="",
                    approach=None, seed=None, size=64, set=["gkd.steps_student=7"], out=None)
        return argparse.Namespace(**{**base, **kw})

    cfg = build_config(ns())
    assert cfg.gkd.approaches == ["student", "kd", "kd_aug", "gkd", "intra", "inter", "cross"]
    assert (cfg.gkd.student, cfg.data.size, cfg.gkd.steps_student, cfg.gkd.augment) == ("mobilenetv2_unet", 64, 7, "mild")
    assert cfg.data.data_dir == "../shared/data/retinal_vessels" and not cfg.gkd.seg_on_views
    assert build_config(ns(approach=["kd"], seed=[3])).seeds == [3]
    with pytest.raises(TedFlError, match="not found"):
        build_config(ns(config="gkd-nope"))
    plain = build_config(ns(config="", size=32, set=["gkd.teacher_channels=[4, 4, 8, 8, 16, 4]"]))
    assert (plain.data.sites, plain.gkd.source, plain.data.size, plain.seeds) == ("retina", "CHASEDB1", 32, [0])
