"""Generalizable distillation: the unit-testable properties of gkd-method.md section 4, the
networks' handles, MAC counting, the fixed-teacher combination and the audit of summed statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ted_fl.config import ModelConfig
from ted_fl.continual import gkd as G
from ted_fl.continual import terms as T
from ted_fl.continual.networks import NETWORKS, build_model
from ted_fl.continual.profiling import count_macs
from ted_fl.continual.step import freeze, train_step
from ted_fl.continual.zoo import STUDENTS

TINY_TEACHER = ModelConfig(name="basic_unet", channels=[4, 4, 8, 8, 16, 4], out_channels=2)


def teacher_student() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return build_model(TINY_TEACHER), build_model(ModelConfig(name="small_unet", out_channels=2))


# --------------------------------------------------------------------- networks
@pytest.mark.parametrize("name", ["basic_unet", *STUDENTS])
def test_networks_registered_with_bottleneck_and_swap(name: str) -> None:
    assert name in NETWORKS
    torch.manual_seed(0)
    cfg = TINY_TEACHER if name == "basic_unet" else ModelConfig(name=name, out_channels=2)
    model = build_model(cfg).eval()
    x = torch.rand(2, 1, 64, 64)
    logits, feats = model.forward_features(x)
    assert logits.shape == (2, 2, 64, 64)
    f = feats["bottleneck"]
    assert f.shape[0] == 2 and "decoder" in feats
    with torch.no_grad(), G.swap_bottleneck(model, lambda o: torch.full_like(o, 10.0)):
        swapped = model(x)
    assert swapped.shape == logits.shape and not torch.allclose(swapped, logits)
    with torch.no_grad():
        assert torch.allclose(model(x), logits)  # the hook lived one block only
    with pytest.raises(Exception, match="bottleneck replacement"), G.swap_bottleneck(model, lambda o: o[:, :1]):
        model(x)


def test_mac_count_matches_the_formula() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, 2), nn.Flatten(), nn.Linear(2 * 16 * 16, 5))
    conv = 8 * 8 * 4 * 1 * 9
    tconv = 8 * 8 * 4 * 2 * 4  # input elements x C_out x k^2
    lin = 5 * 2 * 16 * 16
    assert count_macs(net, (1, 8, 8)) == conv + tconv + lin


# ------------------------------------------------------------------------- MSAN
def test_msan_shapes_for_teacher_and_student() -> None:
    teacher, student = teacher_student()
    for model in (teacher, student):
        msan = G.build_msan(model, (1, 64, 64))
        f = model.forward_features(torch.rand(3, 1, 64, 64))[1]["bottleneck"]
        z = msan.encode(f)
        assert z.shape == (3, G.CODE_DIM)
        assert msan.decode(z, tuple(f.shape[-2:])).shape == f.shape


def test_psae_code_and_reconstruction_shapes() -> None:
    psae = G.PSAE((4, 4, 4, 32), side=8)
    m = (torch.rand(2, 32, 32) > 0.5).long()
    assert psae.encode(m.float().unsqueeze(1)).shape == (2, 32)
    assert psae(m.float().unsqueeze(1)).shape == (2, 1, 32, 32)
    assert G.psae_loss(psae, m) > 0


# ------------------------------------------------------------------------- DCGD
def codes(seed: int, b: int = 3, k: int = 2, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b * k, d, generator=g, dtype=torch.float64)


def test_graph_rows_sum_to_one_and_inter_has_no_self_loops() -> None:
    z0, za = codes(0)
    p = G.intra_matrix(z0, za, 0.1)
    q = G.inter_matrix(za, 0.1)
    assert p.shape == (3, 6) and q.shape == (6, 6)
    assert torch.allclose(p.sum(1), torch.ones(3, dtype=p.dtype))
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=q.dtype))
    assert torch.all(torch.diagonal(q) == 0)
    # the formula itself: row 0 of P by hand
    n0, na = F.normalize(z0, dim=1), F.normalize(za, dim=1)
    assert torch.allclose(p[0], torch.softmax(n0[0] @ na.T / 0.1, 0))


def test_dcgd_zero_when_codes_equal_and_needs_two_views() -> None:
    z0, za = codes(1)
    assert float(G.dcgd_intra(z0, za, z0.clone(), za.clone())) == pytest.approx(0.0, abs=1e-12)
    assert float(G.dcgd_inter(za, za.clone())) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(Exception, match="at least 2 views"):
        G.dcgd_inter(za[:1], za[:1])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 20.0))
def test_dcgd_nonnegative_and_invariant_to_rescaling(seed: int, scale: float) -> None:
    z0s, zas = codes(seed)
    z0t, zat = codes(seed + 1)
    intra, inter = G.dcgd_intra(z0s, zas, z0t, zat), G.dcgd_inter(zas, zat)
    assert float(intra) >= 0 and float(inter) >= 0
    assert float(G.dcgd_intra(scale * z0s, scale * zas, z0t, zat)) == pytest.approx(float(intra), rel=1e-9, abs=1e-12)
    assert float(G.dcgd_inter(zas, scale * zat)) == pytest.approx(float(inter), rel=1e-9, abs=1e-12)


def test_dcgd_invariant_to_consistent_batch_permutation() -> None:
    b, k = 3, 2
    z0s, zas = codes(2, b, k)
    z0t, zat = codes(3, b, k)
    perm = torch.tensor([2, 0, 1])
    view_perm = torch.cat([perm + j * b for j in range(k)])  # view j of anchor perm[i] follows it
    a = G.dcgd_intra(z0s, zas, z0t, zat)
    c = G.dcgd_intra(z0s[perm], zas[view_perm], z0t[perm], zat[view_perm])
    assert float(a) == pytest.approx(float(c), rel=1e-12)
    assert float(G.dcgd_inter(zas, zat)) == pytest.approx(float(G.dcgd_inter(zas[view_perm], zat[view_perm])), rel=1e-12)
    assert float(G.dcgd_intra(z0s, zas, z0t, zat)) != pytest.approx(float(G.dcgd_intra(z0s, zas, z0t[perm], zat)))


def test_dcgd_gives_no_teacher_gradient() -> None:
    z0s, zas = (t.requires_grad_() for t in codes(4))
    z0t, zat = (t.requires_grad_() for t in codes(5))
    (G.dcgd_intra(z0s, zas, z0t, zat) + G.dcgd_inter(zas, zat)).backward()
    assert z0t.grad is None and zat.grad is None
    assert z0s.grad is not None and zas.grad is not None


# ------------------------------------------------------------------------- DICD
class IdentityMSAN(nn.Module):
    """A mock MSAN with H(E(f)) = f: the 'code' is the bottleneck itself."""

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return z


def test_dicd_own_code_reproduces_the_teacher() -> None:
    teacher, _ = teacher_student()
    teacher.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        y_t, feats = teacher.forward_features(x)
        y_hat = G.cross_logits(teacher, IdentityMSAN(), feats["bottleneck"], x)
    assert float(G.kl_pixels(y_t, y_hat)) == pytest.approx(0.0, abs=1e-6)
    assert float(G.kl_pixels(y_t, y_hat + torch.randn_like(y_hat))) > 1e-3


def _gkd_step(name: str) -> tuple[nn.Module, nn.Module, G.MSAN, G.MSAN, dict[str, float]]:
    teacher, student = teacher_student()
    tan, san = G.build_msan(teacher, (1, 32, 32)), G.build_msan(student, (1, 32, 32))
    appr = G.gkd_approach(name, tan, san)
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 32, 32) > 0.7).long()
    x, y = G.make_views(x, y, 2, torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    out = train_step(student, teacher, appr, x, y, opt, n_anchors=2)
    return teacher, student, tan, san, out


def test_gkd_step_runs_every_term_and_leaves_teacher_and_msans_without_grad() -> None:
    teacher, student, tan, san, out = _gkd_step("gkd")
    assert {"seg", "intra", "inter", "cross"} <= set(out)
    assert all(out[k] >= 0 for k in ("intra", "inter", "cross"))
    for m in (teacher, tan, san):
        assert all(p.grad is None for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_dicd_paths_train_the_student_encoder_and_decoder() -> None:
    teacher, student = teacher_student()
    freeze(teacher).eval()  # as train_step does with every teacher
    tan, san = G.build_msan(teacher, (1, 32, 32)), G.build_msan(student, (1, 32, 32))
    tan.requires_grad_(False)
    san.requires_grad_(False)
    x = torch.rand(2, 1, 32, 32)
    enc = student.feature_modules()["enc0"]  # first down block
    head = student.unet.model[2]  # the last up block, after the bottleneck
    with torch.no_grad():
        y_t, t_feats = teacher.forward_features(x)
    # student code through the teacher header and decoder: encoder grads, none in the decoder
    z_s = san.encode(student.forward_features(x)[1]["bottleneck"])
    G.kl_pixels(y_t, G.cross_logits(teacher, tan, z_s, x)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    assert all(p.grad is None for p in head.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)
    # teacher code through the student header and decoder: decoder grads
    z_t = tan.encode(t_feats["bottleneck"]).detach()
    G.kl_pixels(y_t, G.cross_logits(student, san, z_t, x)).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in student.feature_modules()["bottleneck"].parameters())


# ---------------------------------------------------------------- baselines
def test_attention_transfer_and_pairwise_are_zero_for_identical_features() -> None:
    f = torch.rand(2, 8, 8, 8)
    s = T.StepInputs(logits=torch.zeros(2, 2, 8, 8), p=torch.full((2, 2, 8, 8), 0.5), masks=torch.zeros(2, 8, 8),
                     model=nn.Identity(), feats={"bottleneck": f, "decoder": f}, teacher_feats={"bottleneck": 3 * f, "decoder": f})
    assert float(G.AttentionTransfer().compute(s)) == pytest.approx(0.0, abs=1e-6)  # AT is scale-free
    assert float(G.PairwiseAffinity().compute(s)) == pytest.approx(0.0, abs=1e-6)
    s.teacher_feats = {"bottleneck": torch.rand(2, 8, 8, 8), "decoder": f}
    assert float(G.AttentionTransfer().compute(s)) > 0
    assert float(G.PairwiseAffinity().compute(s)) > 0


def test_views_keep_masks_aligned_with_images() -> None:
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, :4, :8] = 1.0
    y = (x[:, 0] > 0).long()
    xv, yv = G.make_views(x, y, 3, torch.Generator().manual_seed(1))
    assert xv.shape == (8, 1, 16, 16) and yv.shape == (8, 16, 16)
    for i in range(8):  # the bright region (the 'structure') is where the mask is
        inside = xv[i, 0][yv[i] > 0].mean()
        outside = xv[i, 0][yv[i] == 0].mean()
        assert inside > outside + 0.3


# ------------------------------------------------------------ fixed teacher (item 5)
def test_fixed_teacher_term_is_kd_against_the_fixed_teacher() -> None:
    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.combined import with_fixed_teacher

    teacher, student = teacher_student()
    teacher.eval()
    appr = with_fixed_teacher(get_approach("seq"), teacher, "kd", 1.0)
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 32, 32) > 0.7).long()
    with torch.no_grad():
        expected = T.cross_entropy(T.probabilities(student(x)), T.probabilities(teacher(x)))
    out = train_step(student, None, appr, x, y, torch.optim.SGD(student.parameters(), lr=0.0))
    assert out["fixed_kd"] == pytest.approx(float(expected), rel=1e-5)
    out = train_step(student, None, with_fixed_teacher(get_approach("seq"), teacher, "at", 1.0), x, y,
                     torch.optim.SGD(student.parameters(), lr=0.0))
    assert out["fixed_at"] > 0


# ----------------------------------------------------------------------- audit
def test_audit_allows_declared_sums_only() -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from ted_fl.continual.fsd import GaussStats, packed_lengths
    from ted_fl.federated import messages as M
    from ted_fl.federated.message_log import violations

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    stats = GaussStats.of(np.random.default_rng(0).normal(size=(5, 4))).to_arrays()
    req = Message(RecordDict({M.CONFIG: ConfigRecord({"stats_lengths": sorted(packed_lengths(4))})}),
                  dst_node_id=1, message_type="evaluate")
    good = RecordDict({M.STATS: ArrayRecord({k: Array(v) for k, v in stats.items()})})
    assert violations(Message(good, dst_node_id=0, message_type="evaluate"), req, (16, 16)) == []
    bad = RecordDict({M.STATS: ArrayRecord({"z": Array(np.zeros((5, 4)))})})  # per-image vectors
    assert violations(Message(bad, dst_node_id=0, message_type="evaluate"), req, (16, 16))
    req2 = Message(RecordDict({M.CONFIG: ConfigRecord({"split": "test"})}), dst_node_id=1, message_type="evaluate")
    assert violations(Message(good, dst_node_id=0, message_type="evaluate"), req2, (16, 16))  # undeclared


def test_dcgd_values_by_hand() -> None:
    z0s, zas = codes(6, 2, 2, 3)
    z0t, zat = codes(7, 2, 2, 3)
    tau = 0.5

    def n(z: torch.Tensor) -> np.ndarray:
        z = z.numpy()
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def softmax(a: np.ndarray) -> np.ndarray:
        e = np.exp(a - a.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        m = p > 0
        return float(np.mean([np.sum(p[i][m[i]] * np.log(p[i][m[i]] / q[i][m[i]])) for i in range(len(p))]))

    p_t, p_s = softmax(n(z0t) @ n(zat).T / tau), softmax(n(z0s) @ n(zas).T / tau)
    assert float(G.dcgd_intra(z0s, zas, z0t, zat, tau)) == pytest.approx(tau**2 * kl(p_t, p_s), rel=1e-9)
    eye = np.eye(4, dtype=bool)
    q_t = softmax(np.where(eye, -np.inf, n(zat) @ n(zat).T / tau))
    q_s = softmax(np.where(eye, -np.inf, n(zas) @ n(zas).T / tau))
    assert float(G.dcgd_inter(zas, zat, tau)) == pytest.approx(tau**2 * kl(q_t, q_s), rel=1e-9)
    y_t, y_h = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    q, p = torch.softmax(y_t / 2, 1), torch.softmax(y_h / 2, 1)
    assert float(G.kl_pixels(y_t, y_h, 2.0)) == pytest.approx(float(4 * (q * (q / p).log()).sum(1).mean()), rel=1e-5)


def test_stage_training_is_deterministic() -> None:
    from ted_fl.continual.gkd_stages import train_with_terms
    from ted_fl.data.types import Split

    rng = np.random.default_rng(0)
    imgs = rng.random((4, 1, 32, 32)).astype(np.float32)
    split = Split(imgs, (imgs[:, 0] > 0.6).astype(np.int64), np.array(list("abcd")))
    weights = []
    for _ in range(2):
        teacher, student = teacher_student()
        tan, san = G.build_msan(teacher, (1, 32, 32)), G.build_msan(student, (1, 32, 32))
        train_with_terms(student, teacher, G.gkd_approach("gkd", tan, san), split, steps=2, batch_size=2, crop=16,
                         lr=1e-3, seed=3, views=2)
        weights.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_regenerated_results_page_keeps_marked_sections(tmp_path) -> None:
    from ted_fl.run.markdown import marked_sections, write_section

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nold body\n")
    write_section(doc, "gkd", "## GKD\n\ntable")
    blocks = marked_sections(doc.read_text())
    assert blocks == ["<!-- section:gkd:start -->\n## GKD\n\ntable\n<!-- section:gkd:end -->"]


def test_site_worker_trains_a_student_with_a_fixed_teacher(tmp_path) -> None:
    """The continual combination end to end in the worker both runners call: a lightweight student
    (model.name) learns with the approach's terms plus the fixed teacher's distillation."""
    from ted_fl.config import ExperimentConfig
    from ted_fl.data.types import Split
    from ted_fl.schedule.engine import model_weights
    from ted_fl.schedule.worker import SiteWorker

    teacher, _ = teacher_student()
    path = tmp_path / "teacher.pt"
    torch.save({"name": "basic_unet", "channels": TINY_TEACHER.channels, "in_channels": 1, "out_channels": 2,
                "weights": model_weights(teacher)}, path)
    cfg = ExperimentConfig()
    cfg.model = ModelConfig(name="small_unet", out_channels=2)
    cfg.gkd.fixed_teacher = str(path)
    cfg.gkd.fixed_term = "skd"
    w = SiteWorker(cfg)
    rng = np.random.default_rng(0)
    imgs = rng.random((4, 1, 32, 32)).astype(np.float32)
    split = Split(imgs, (imgs[:, 0] > 0.6).astype(np.int64), np.array(list("abcd")))
    start = model_weights(w.student)
    out = w.train_round(approach="kd", data=split, weights=start, teacher=w.set_teacher("s0", start), aux={},
                        steps=2, lr=1e-3, seed=0, probes=None, optimizer_state=None, val=None, per_volume=False)
    assert out.metrics["fixed_skd"] > 0 and out.metrics["kd"] > 0
    assert any(not np.array_equal(out.weights[k], start[k]) for k in start)
    cfg.gkd.fixed_teacher = str(tmp_path / "missing.pt")
    with pytest.raises(Exception, match="fixed teacher checkpoint"):
        w.train_round(approach="seq", data=split, weights=start, teacher=None, aux={}, steps=1, lr=1e-3, seed=0,
                      probes=None, optimizer_state=None, val=None, per_volume=False)


def _frame(gkd: list[float], kd: list[float]):
    import pandas as pd

    rows = [{"approach": a, "seed": s, "dice": v, "auc": 0.8} for a, vals in (("gkd", gkd), ("kd", kd))
            for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_verdict_pairs_seeds_and_needs_an_interval_that_excludes_zero() -> None:
    from ted_fl.run.gkd_page import verdict

    # d = +0.02, +0.05, +0.01: mean +0.027, sd 0.0208, t(0.975, 2) = 4.303 -> [-0.025, +0.078]: holds 0.
    text = verdict(_frame([0.52, 0.55, 0.51], [0.50, 0.50, 0.50]))
    assert text.startswith("**no clear difference between gkd and kd")
    assert "Dice +0.027 [95% CI -0.025, +0.078] (n=3)" in text and "higher in 3 of 3" in text
    # every seed higher is not enough; a tight gain is: d = +0.020, +0.021, +0.022 -> [+0.019, +0.023].
    tight = verdict(_frame([0.520, 0.521, 0.522], [0.50, 0.50, 0.50]))
    assert tight.startswith("**gkd helps the student generalise more than kd**")
    assert "[95% CI +0.019, +0.023]" in tight
    assert verdict(_frame([0.480, 0.479, 0.478], [0.50, 0.50, 0.50])).startswith("**gkd does worse than kd")
    # pairing: kd varies with the seed, gkd tracks it, so the per-seed differences are tight.
    paired = verdict(_frame([0.41, 0.61, 0.51], [0.40, 0.60, 0.50]))
    assert paired.startswith("**gkd helps") and "seeds to detect 0.02 Dice at this spread: 2" in paired


def test_verdict_with_one_seed_states_no_interval() -> None:
    from ted_fl.run.gkd_page import verdict

    text = verdict(_frame([0.60], [0.50]))
    assert text.startswith("**gkd is ahead of kd in the one seed run (no interval: not established)**")
    assert "(one seed, no interval)" in text and "unknown (one seed, no spread)" in text
    assert verdict(_frame([0.40], [0.50])).startswith("**gkd is behind kd in the one seed run")
    assert verdict(_frame([0.40], [])).startswith("No seed has both gkd and kd")


GKD_ROWS = {"teacher": 0.70, "student": 0.40, "kd": 0.45, "kd_aug": 0.44, "gkd": 0.47, "intra": 0.41,
            "inter": 0.40, "cross": 0.46}


def _gkd_run(root, seed: int, shift: float):
    from ted_fl.config import ExperimentConfig
    from ted_fl.run.directory import RunDir

    cfg = ExperimentConfig(name="gkd-test", seeds=[seed])
    cfg.data.sites, cfg.data.split_seed = "retina", "seed"
    cfg.gkd.source, cfg.gkd.approaches = "CHASEDB1", [a for a in GKD_ROWS if a != "teacher"]
    run = RunDir(root / f"run{seed}")
    run.path.mkdir(parents=True)
    run.write_config(cfg)
    rows = []
    for a, v in GKD_ROWS.items():
        for site, off in (("CHASEDB1", 0.1), ("DRIVE", 0.0), ("STARE", -0.02)):
            for metric, val in (("dice", v + off + shift + 0.001 * seed), ("auc", 0.9 + shift)):
                rows.append({"approach": a, "seed": seed, "stage": 0, "stage_site": "CHASEDB1", "round": -1,
                             "site": site, "split": "test", "label": "mean", "metric": metric, "value": val})
    run.write_metrics(rows)
    return run


def test_gkd_headline_block_has_the_table_budget_and_paired_findings(tmp_path) -> None:
    from ted_fl.commands.gkd_report import main

    runs = [_gkd_run(tmp_path, s, shift) for s, shift in ((0, 0.0), (1, 0.05), (2, -0.03))]
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n<!-- headline:retina:start -->\nkeep\n<!-- headline:retina:end -->\n")
    argv = [str(r.path) for r in runs] + ["--headline", "gkd-retina", "--doc", str(doc), "--command", "CMD"]
    assert main(argv) == 0
    text = doc.read_text()
    assert "keep" in text and "<!-- headline:gkd-retina:start -->" in text
    block = text.split("<!-- headline:gkd-retina:start -->")[1]
    assert "### gkd-retina: GKD on retina (train CHASEDB1, test DRIVE, STARE)" in block
    assert "| approach | seeds | Dice source | Dice unseen | AUC unseen |" in block
    # gkd: source 0.47 + 0.1, unseen 0.47 + (0 - 0.02) / 2, each plus the seed's shift and 0.001 x seed:
    # source 0.570, 0.621, 0.542 -> 0.578 ± 0.040; unseen 0.460, 0.511, 0.432 -> 0.468 ± 0.040
    assert "| gkd | 3 | 0.578 ± 0.040 | 0.468 ± 0.040 | 0.907 ± 0.040 |" in block
    assert "each seed draws its own split" in block and "```bash\nCMD\n```" in block
    # gkd - kd = +0.02 in every seed, exactly: a zero-width interval that excludes 0
    assert "- gkd helps the student generalise more than kd: " in block
    assert "- gkd helps the student generalise more than kd_aug: " in block
    assert "- intra helps the student generalise more than student: " in block
    assert "- no clear difference between inter and student on the unseen domains (the Dice interval holds 0)" in block
    assert "Generated by `python -m ted_fl.gkd_report" in block
    assert main([str(runs[0].path), "--headline", "gkd retina", "--doc", str(doc)]) == 2
    assert main([str(runs[0].path), "--headline", "gkd-retina"]) == 2
