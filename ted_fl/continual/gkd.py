"""Generalizable distillation (Qi et al., JBHI 2024) as modules and named loss terms.

Spec: docs gkd-method.md (section numbers below are its). Notation: f_m (B, C_m, h_m, w_m) is the
bottleneck of model m in {T, S}; D = 512 code channels, s = 16 code side.

- `MSAN` (2.1): adapter A_m (1x1 conv C_m -> D, bilinear resize to s x s), encoder E_m (per channel
  Linear(s^2, 64), GELU, Linear(64, 1) -> z_m in R^{B x D}) and header H_m (Linear(1, 64), GELU,
  Linear(64, s^2) -> B x D x s x s, 1x1 conv D -> C_m, resize to h_m x w_m).
- `PSAE` (2.0): a mask autoencoder whose bottleneck passes through its own E_P / H_P: z_P holds
  shape, no scanner style. Plain double-conv blocks instead of the repository's SK blocks [our choice].
- `act_loss` (2.2): ||z_m - sg(z_P)||^2 + MSE(H_m(z_m), sg(f_m)) + CE(Dec_m(H_m(z_m); skips), y)
  + ||z_m(x) - z_m(aug(x))||^2, each a mean over its elements, weight 1.
- Terms for `step.train_step`: `DCGDIntra`, `DCGDInter` (2.3), `DICD` (2.4), and the baselines
  `AttentionTransfer` (AT) and `PairwiseAffinity` (SKD's pair-wise term); pixel KD is `terms.KD`.
- `swap_bottleneck`: a forward hook that replaces a network's bottleneck output for one forward.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ted_fl.config import GKDApproachName, LossConfig, TeacherMode
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach, WeightedTerm
from ted_fl.continual.networks import features
from ted_fl.continual.step import running_stats_frozen, teacher_mode
from ted_fl.continual.training import batch_indices
from ted_fl.errors import TedFlError, unknown

CODE_DIM = 512  # D
CODE_SIDE = 16  # s


def _hw(f: torch.Tensor) -> tuple[int, int]:
    """The spatial size (H, W) of a (..., H, W) tensor."""
    return int(f.shape[-2]), int(f.shape[-1])


# --------------------------------------------------------------------- bottlenecks
@typing.runtime_checkable
class HasBottleneck(typing.Protocol):
    """A network that names its bottleneck module itself (the zoo networks, SegNet)."""

    def bottleneck_module(self) -> nn.Module: ...


@typing.runtime_checkable
class HasFeatureModules(typing.Protocol):
    """A network with named feature points (ted_fl.continual.networks' MONAI U-Net)."""

    def feature_modules(self) -> dict[str, nn.Module]: ...


def bottleneck_module(model: nn.Module) -> nn.Module:
    """The module whose output is `model`'s bottleneck (zoo networks, SegNet, any `feature_modules`)."""
    if isinstance(model, HasBottleneck):
        return model.bottleneck_module()
    if isinstance(model, HasFeatureModules) and "bottleneck" in model.feature_modules():
        return model.feature_modules()["bottleneck"]
    raise TedFlError(f"network {type(model).__name__} exposes no bottleneck; give it bottleneck_module() "
                     "or a 'bottleneck' entry in feature_modules() to use it in generalizable distillation")


@contextlib.contextmanager
def swap_bottleneck(model: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """During the block, `model`'s bottleneck output f is replaced by make(f) (same shape, checked);
    the decoder keeps its own skips (DICD's header exchange)."""

    def hook(_m: nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        new = make(out)
        if new.shape != out.shape:
            raise TedFlError(f"bottleneck replacement of shape {tuple(new.shape)} for {tuple(out.shape)}")
        return new

    handle = bottleneck_module(model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def bottleneck_shape(model: nn.Module, image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C_m, h_m, w_m) of the bottleneck for one image of `image_shape`."""
    seen: list[tuple[int, ...]] = []
    h = bottleneck_module(model).register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape[1:])))
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *image_shape))
    finally:
        h.remove()
        model.train(was)
    return seen[0]


def cross_logits(model: nn.Module, msan: MSAN, code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Dec_m(H_m(code); skips_m(x)): `model` on x with its bottleneck replaced by msan.decode(code)."""
    with swap_bottleneck(model, lambda f: msan.decode(code, _hw(f))):
        return model(x)


# ---------------------------------------------------------------------------- MSAN
class MLPEncoder(nn.Module):
    """E: per channel Linear(s^2, 64), GELU, Linear(64, 1): (B, D, s^2) -> (B, D) [repo Mlp]."""

    def __init__(self, side: int = CODE_SIDE, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(side * side, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a.flatten(2)).squeeze(-1)


class MLPHeader(nn.Module):
    """H: per channel Linear(1, 64), GELU, Linear(64, s^2): (B, D) -> (B, D, s, s) [repo Mlp]."""

    def __init__(self, side: int = CODE_SIDE, hidden: int = 64) -> None:
        super().__init__()
        self.side = side
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.GELU(), nn.Linear(hidden, side * side))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.unsqueeze(-1)).reshape(z.shape[0], z.shape[1], self.side, self.side)


class MSAN(nn.Module):
    """Model-specific alignment network for a bottleneck of `channels` channels (TAN or SAN).

    encode: f (B, C_m, h, w) -> A_m -> E_m -> z (B, D); decode: z -> H_m -> 1x1 conv D -> C_m ->
    bilinear resize to (h, w). T and S codes share the D-dim space, so DICD can swap them.
    """

    def __init__(self, channels: int, dim: int = CODE_DIM, side: int = CODE_SIDE) -> None:
        super().__init__()
        self.channels, self.dim, self.side = channels, dim, side
        self.adapter = nn.Conv2d(channels, dim, 1)
        self.encoder = MLPEncoder(side)
        self.header = MLPHeader(side)
        self.out = nn.Conv2d(dim, channels, 1)

    def encode(self, f: torch.Tensor) -> torch.Tensor:
        a = F.interpolate(self.adapter(f), size=(self.side, self.side), mode="bilinear", align_corners=False)
        return self.encoder(a)

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        g = self.out(self.header(z))
        return F.interpolate(g, size=size, mode="bilinear", align_corners=False)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(f), _hw(f))


def build_msan(model: nn.Module, image_shape: tuple[int, ...], dim: int = CODE_DIM,
               side: int = CODE_SIDE) -> MSAN:
    return MSAN(bottleneck_shape(model, image_shape)[0], dim, side)


# ---------------------------------------------------------------------------- P-SAE
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class PSAE(nn.Module):
    """Pre-trained semantic autoencoder on masks: encoder 1 -> c0 -> c1 -> c2 -> D with 3 max-pools,
    bottleneck resized to s x s and passed through E_P (code z_P) and H_P, decoder of 3 transposed
    convs and a 1x1 conv, no skips [repo LatentNet]. Trained with Dice + BCE reconstruction."""

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256, CODE_DIM), side: int = CODE_SIDE) -> None:
        super().__init__()
        if len(channels) != 4:
            raise TedFlError(f"P-SAE needs 4 channel widths (the last is D), got {list(channels)}")
        c0, c1, c2, d = channels
        self.side = side
        self.enc = nn.Sequential(_block(1, c0), nn.MaxPool2d(2), _block(c0, c1), nn.MaxPool2d(2),
                                 _block(c1, c2), nn.MaxPool2d(2), _block(c2, d))
        self.encoder, self.header = MLPEncoder(side), MLPHeader(side)
        self.dec = nn.Sequential(nn.ConvTranspose2d(d, c2, 2, 2), nn.ReLU(True), nn.ConvTranspose2d(c2, c1, 2, 2),
                                 nn.ReLU(True), nn.ConvTranspose2d(c1, c0, 2, 2), nn.ReLU(True), nn.Conv2d(c0, 1, 1))

    def encode(self, mask: torch.Tensor) -> torch.Tensor:
        f = self.enc(mask)
        return self.encoder(F.interpolate(f, size=(self.side, self.side), mode="bilinear", align_corners=False))

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        h, w = mask.shape[-2] // 8, mask.shape[-1] // 8
        g = F.interpolate(self.header(self.encode(mask)), size=(h, w), mode="bilinear", align_corners=False)
        return self.dec(g)


def psae_loss(model: PSAE, masks: torch.Tensor) -> torch.Tensor:
    """Dice + BCE reconstruction of the binary mask (B, H, W) from itself."""
    y = (masks > 0).float().unsqueeze(1)
    p = torch.sigmoid(model(y))
    dice = 1.0 - (2 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    return dice + F.binary_cross_entropy(p.clamp(T.EPS, 1 - T.EPS), y)


# ---------------------------------------------------------------------- augmentation
AUGMENT = {  # gamma range, contrast range, blur sigma (lowest, span), noise std
    "spec": ((0.7, 1.5), (0.75, 1.25), (0.3, 0.9), 0.03),  # the spec's list: gamma/contrast/blur/noise
    "mild": ((0.8, 1.25), (0.9, 1.1), (0.0, 0.0), 0.01),  # no blur (thin vessels), narrower ranges
}


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, geometric: bool = True,
            strength: str = "spec") -> tuple[torch.Tensor, torch.Tensor]:
    """One random view per image [our choice]: gamma, contrast, Gaussian blur, noise (ranges by
    `strength`, see AUGMENT), and (if `geometric`) flips, applied to the mask too. Images are
    min-max normalised to [0, 1]."""
    if strength not in AUGMENT:
        raise unknown("augmentation", strength, AUGMENT, "gkd.augment")
    (g_lo, g_hi), (c_lo, c_hi), (s_lo, s_span), noise = AUGMENT[strength]
    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)).to(x)

    v = x.clamp_min(0.0) ** u(g_lo, g_hi)
    mean = v.mean(dim=(2, 3), keepdim=True)
    v = (v - mean) * u(c_lo, c_hi) + mean
    sigma = float(s_lo + s_span * torch.rand(1, generator=gen))  # drawn always: same stream for every strength
    if s_span > 0:
        v = _blur(v, sigma)
    v = v + noise * torch.randn(v.shape, generator=gen).to(x)
    yy = y.clone()
    if not geometric:
        return v, yy
    flip_h = torch.rand(b, generator=gen) < 0.5
    flip_v = torch.rand(b, generator=gen) < 0.5
    v[flip_h], yy[flip_h] = v[flip_h].flip(-1), yy[flip_h].flip(-1)
    v[flip_v], yy[flip_v] = v[flip_v].flip(-2), yy[flip_v].flip(-2)
    return v, yy


def _blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 5-tap Gaussian blur with reflect padding."""
    k = torch.exp(-(torch.arange(-2, 3, dtype=v.dtype) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(v)
    c = v.shape[1]
    v = F.conv2d(F.pad(v, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(v, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def make_views(x: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator, strength: str = "spec"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors followed by K views: rows [0, B) anchors, row B + j*B + b the j-th view of anchor b."""
    xs, ys = [x], [y]
    for _ in range(k):
        v, vy = augment(x, y, gen, strength=strength)
        xs.append(v)
        ys.append(vy)
    return torch.cat(xs), torch.cat(ys)


def view_owner(b: int, k: int) -> torch.Tensor:
    """For the N = B*K views in `make_views` order, the index of their anchor."""
    return torch.arange(b).repeat(k)


# ---------------------------------------------------------------------------- ACT
def act_loss(model: nn.Module, msan: MSAN, psae: PSAE, x: torch.Tensor, y: torch.Tensor,
             x_aug: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four ACT terms (2.2) for a frozen `model` (in the mode its caller set) and its trainable MSAN."""
    with torch.no_grad():
        _, feats = features(model, x)
        f = feats["bottleneck"]
        z_p = psae.encode((y > 0).float().unsqueeze(1))
        f_aug = features(model, x_aug)[1]["bottleneck"]
    z = msan.encode(f)
    out = {
        "act_align": F.mse_loss(z, z_p),
        "act_recon": F.mse_loss(msan.decode(z, _hw(f)), f),
        "act_seg": F.cross_entropy(cross_logits(model, msan, z, x), y.long()),
        "act_consist": F.mse_loss(z, msan.encode(f_aug)),
    }
    out["total"] = sum(out.values())  # type: ignore[assignment]
    return out


# --------------------------------------------------------------------------- DCGD
NEAR_UNIFORM = 0.9  # normalised row entropy at or above which a graph is near-uniform (spec 2.3's check)


def centred(z: torch.Tensor) -> torch.Tensor:
    """z minus its mean over the rows (the batch's anchors and views): without it the codes are
    mostly their common direction and every cosine graph is near-uniform (spec 2.3, revised)."""
    return z - z.mean(dim=0, keepdim=True)


def intra_matrix(z0: torch.Tensor, za: torch.Tensor, tau: float) -> torch.Tensor:
    """P = softmax_row(Z0 Za^T / tau), B x N, on L2-normalised codes (the star-shaped intra graph)."""
    z0, za = F.normalize(z0, dim=1), F.normalize(za, dim=1)
    return torch.softmax(z0 @ za.T / tau, dim=1)


def inter_matrix(za: torch.Tensor, tau: float) -> torch.Tensor:
    """Q = softmax_row((Za Za^T - inf I) / tau), N x N (complete graph over the views, no self loops)."""
    if za.shape[0] < 2:
        raise TedFlError(f"the inter graph needs at least 2 views, got {za.shape[0]}")
    za = F.normalize(za, dim=1)
    sim = za @ za.T / tau
    eye = torch.eye(za.shape[0], dtype=torch.bool, device=za.device)
    return torch.softmax(sim.masked_fill(eye, float("-inf")), dim=1)


def row_entropy(p: torch.Tensor, support: int | None = None) -> float:
    """Mean over rows of H(p[i]) / log(support): 1 for uniform rows, 0 for one-hot ones. `support`
    defaults to the number of columns (the inter graph's is one less: no self loop)."""
    cols = support if support is not None else p.shape[1]
    if cols < 2:
        return 0.0
    h = -torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p)).sum(dim=1)
    return float((h / np.log(cols)).mean())


def kl_rows(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """mean over rows of KL(p_t[i] || p_s[i]); entries with p_t = 0 contribute 0."""
    log_t = torch.log(p_t.clamp_min(1e-30))
    log_s = torch.log(p_s.clamp_min(1e-30))
    return torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(dim=1).mean()


def dcgd_intra(z0_s: torch.Tensor, za_s: torch.Tensor, z0_t: torch.Tensor, za_t: torch.Tensor,
               tau: float = 0.1) -> torch.Tensor:
    """L_intra = tau^2 mean_b KL(P_T[b] || P_S[b])."""
    return tau**2 * kl_rows(intra_matrix(z0_t, za_t, tau).detach(), intra_matrix(z0_s, za_s, tau))


def dcgd_inter(za_s: torch.Tensor, za_t: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """L_inter = tau^2 mean_i KL(Q_T[i] || Q_S[i])."""
    return tau**2 * kl_rows(inter_matrix(za_t, tau).detach(), inter_matrix(za_s, tau))


def kl_pixels(y_t: torch.Tensor, y_hat: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """t^2 mean over pixels of KL(softmax(y_t / t) || softmax(y_hat / t)) (classes on dim 1)."""
    log_q = torch.log_softmax(y_t / t, dim=1)
    log_p = torch.log_softmax(y_hat / t, dim=1)
    return t**2 * (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


# ------------------------------------------------------------------------- terms
def _codes(s: T.StepInputs, tan: MSAN, san: MSAN) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_S with gradient through the frozen SAN, z_T without gradient) for every row of the step."""
    cache = s.cache
    if "z_s" not in cache:
        assert s.feats is not None and s.teacher_feats is not None
        cache["z_s"] = san.encode(s.feats["bottleneck"])
        with torch.no_grad():
            cache["z_t"] = tan.encode(s.teacher_feats["bottleneck"]).clone()  # a normal tensor, never an inference one
    return cache["z_s"], cache["z_t"]


def _graph_entropy(s: T.StepInputs, graph: str, p_t: torch.Tensor, p_s: torch.Tensor, support: int) -> None:
    """Record the teacher's and student's normalised row entropies of one graph in the step's stats
    (metrics entropy_<graph>_t / _s) and flag a near-uniform one (entropy_near_uniform = 1)."""
    e_t, e_s = row_entropy(p_t.detach(), support), row_entropy(p_s.detach(), support)
    s.stats[f"entropy_{graph}_t"], s.stats[f"entropy_{graph}_s"] = e_t, e_s
    flag = float(max(e_t, e_s) >= NEAR_UNIFORM)
    s.stats["entropy_near_uniform"] = max(s.stats.get("entropy_near_uniform", 0.0), flag)


class _GKDTerm(T.Term):
    needs_teacher = True
    needs_features = True

    def __init__(self, tan: MSAN, san: MSAN, tau: float = 0.1) -> None:
        self.tan, self.san, self.tau = tan, san, float(tau)


class DCGDIntra(_GKDTerm):
    """L_intra = tau^2 mean_b KL(P_T[b] || P_S[b]), P_m = softmax_row(Z0_m Za_m^T / tau) (2.3);
    z = E_m codes of anchors (Z0) and their K views (Za), centred by the batch mean, L2-normalised."""

    name = "intra"

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if s.teacher_feats is None:
            return None
        b = s.n_anchors or 0
        z_s, z_t = _codes(s, self.tan, self.san)
        if b == 0 or z_s.shape[0] == b:
            return None
        z_s, z_t = centred(z_s), centred(z_t)
        p_t = intra_matrix(z_t[:b], z_t[b:], self.tau).detach()
        p_s = intra_matrix(z_s[:b], z_s[b:], self.tau)
        _graph_entropy(s, "intra", p_t, p_s, p_t.shape[1])
        return self.tau**2 * kl_rows(p_t, p_s)


class DCGDInter(_GKDTerm):
    """L_inter = tau^2 mean_i KL(Q_T[i] || Q_S[i]), Q_m = softmax_row((Za Za^T - inf I) / tau) (2.3),
    on the batch-centred codes as DCGDIntra."""

    name = "inter"

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if s.teacher_feats is None:
            return None
        b = s.n_anchors or 0
        z_s, z_t = _codes(s, self.tan, self.san)
        if b == 0 or z_s.shape[0] - b < 2:
            return None
        z_s, z_t = centred(z_s), centred(z_t)
        q_t = inter_matrix(z_t[b:], self.tau).detach()
        q_s = inter_matrix(z_s[b:], self.tau)
        _graph_entropy(s, "inter", q_t, q_s, q_t.shape[1] - 1)
        return self.tau**2 * kl_rows(q_t, q_s)


class DICD(_GKDTerm):
    """L_cross = t^2 mean_px KL(sm(y_T/t) || sm(yhat_ST/t)) + t^2 mean_px KL(sm(y_T/t) || sm(yhat_TS/t)),
    yhat_ST = Dec_T(H_T(z_S); skips_T(x)) (frozen teacher, differentiable: trains the student
    encoder), yhat_TS = Dec_S(H_S(sg(z_T)); skips_S(x)) (trains the student decoder); anchors only (2.4).

    One normalisation mode for the teacher: the cross prediction runs the teacher in `teacher_mode`,
    the mode the step computed y_T and the TAN's features in (the approach's loss.teacher_mode, "eval"
    for every GKD row), so a perfectly aligned TAN (H_T(E_T(f)) = f) makes the ST half zero. The two
    halves are also recorded (stats cross_st, cross_ts).
    """

    name = "cross"

    def __init__(self, tan: MSAN, san: MSAN, t: float = 1.0, teacher_mode: str = "eval") -> None:
        super().__init__(tan, san)
        self.t = float(t)
        self.teacher_mode = teacher_mode

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if s.teacher is None or s.teacher_logits is None or s.images is None:
            return None

        b = s.n_anchors or s.images.shape[0]
        x = s.images[:b]
        z_s, z_t = _codes(s, self.tan, self.san)
        y_t = s.teacher_logits[:b].detach()
        with teacher_mode(s.teacher, self.teacher_mode):
            y_st = cross_logits(s.teacher, self.tan, z_s[:b], x)
        with running_stats_frozen(s.model):
            y_ts = cross_logits(s.model, self.san, z_t[:b].detach(), x)
        st, ts = kl_pixels(y_t, y_st, self.t), kl_pixels(y_t, y_ts, self.t)
        s.stats["cross_st"], s.stats["cross_ts"] = float(st.detach()), float(ts.detach())
        return st + ts


class AnchorSegLoss(T.SegLoss):
    """L_seg on the anchors only (rows [0, n_anchors)): the views enter only DCGD (spec 2.5, revised)."""

    def compute(self, s: T.StepInputs) -> torch.Tensor:
        b = s.n_anchors or s.p.shape[0]
        p = s.p[:b]
        return self(p, T.one_hot(s.masks[:b], p.shape[1]).to(p), s.per_sample)


def attention_map(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """AT's spatial attention: mean_c f^2, resized to `size`, flattened and L2-normalised per sample."""
    a = f.pow(2).mean(dim=1, keepdim=True)
    a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), dim=1)


class AttentionTransfer(T.Term):
    """AT (Zagoruyko & Komodakis 2017): sum over layers l in {bottleneck, decoder} of
    mean_b ||a_S^l - a_T^l||_2, a = normalize(vec(mean_c f^2)) at the student's resolution."""

    name = "at"
    needs_teacher = True
    needs_features = True
    layers = ("bottleneck", "decoder")

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if not s.feats or not s.teacher_feats:
            return None
        total = torch.zeros((), device=s.logits.device)
        for name in self.layers:
            if name in s.feats and name in s.teacher_feats:
                f_s = s.feats[name]
                size = _hw(f_s)
                total = total + (attention_map(f_s, size) - attention_map(s.teacher_feats[name].detach(), size)
                                 ).norm(dim=1).mean()
        return total


def affinity(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A = F^T F on per-pixel L2-normalised features pooled to `size`: (B, HW, HW) cosine affinities."""
    g = F.adaptive_avg_pool2d(f, size)
    g = F.normalize(g.flatten(2), dim=1)
    return g.transpose(1, 2) @ g


class PairwiseAffinity(T.Term):
    """SKD's pair-wise distillation (Liu et al. 2019): mean over (b, i, j) of (A_S - A_T)^2 on the
    bottleneck, both pooled to the student's bottleneck grid (at most 16 x 16)."""

    name = "pair"
    needs_teacher = True
    needs_features = True

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if not s.feats or not s.teacher_feats:
            return None
        f_s, f_t = s.feats["bottleneck"], s.teacher_feats["bottleneck"].detach()
        size = (min(16, f_s.shape[-2]), min(16, f_s.shape[-1]))
        return (affinity(f_s, size) - affinity(f_t, size)).pow(2).mean()


# ---------------------------------------------------------------------- approaches
GKD_APPROACHES: tuple[str, ...] = typing.get_args(GKDApproachName)  # student, student_aug, kd, ..., gkd
NEEDS_ALIGNMENT = frozenset({"gkd", "intra", "inter", "cross", "intra_inter"})
DCGD_ROWS = frozenset({"gkd", "intra", "inter", "intra_inter"})  # rows whose batch holds views for DCGD
AUGMENTED_ROWS = frozenset({"student_aug", "kd_aug"})  # rows that train L_seg (and KD) on the views too
SCRATCH_ROW = "student"  # the scratch student itself: trained in the student stage, never distilled
TEACHER_MODE: TeacherMode = "eval"  # every GKD row: the teacher's running statistics (as it is scored and ACT fits TAN)
# the rows whose batch is anchors + K views (`uses_views`); kept for callers of the old name
USES_VIEWS = AUGMENTED_ROWS | DCGD_ROWS


def uses_views(name: str, seg_on_views: bool = False) -> bool:
    """Whether row `name` trains on anchors followed by K views. gkd.seg_on_views (the old rule)
    also gives the views to L_seg of the DCGD rows and of cross."""
    return name in USES_VIEWS or (seg_on_views and name == "cross")


def gkd_approach(name: str, tan: MSAN | None = None, san: MSAN | None = None, *, w_intra: float = 1.0,
                 w_inter: float = 1.0, w_cross: float = 0.5, w_kd: float = 1.0, w_at: float = 1.0,
                 w_pair: float = 1.0, tau: float = 0.1, seg_on_views: bool = False) -> Approach:
    """The student objective of each row of the evidence (2.5), as an `approaches.Approach`:
    student = L_seg; student_aug = L_seg on anchors and views; kd = L_seg + KD; kd_aug = L_seg + KD on
    anchors and views (augmentation alone, beside kd); at = L_seg + AT; skd = L_seg + KD + pair;
    gkd = L_seg(anchors) + intra + inter + 0.5 cross (views only in DCGD); intra / inter / cross /
    intra_inter keep one or two of the three. `seg_on_views`: the old rule, L_seg on anchors and
    views in the DCGD rows. L_seg is the project's Dice + BCE (the spec's CE [our choice]). Every
    row runs the teacher in eval mode (TEACHER_MODE), the mode DICD and ACT use."""
    if name not in GKD_APPROACHES:
        raise unknown("approach", name, GKD_APPROACHES, "--approach")
    for m in (tan, san):  # frozen: the gradient reaches the student through them, never into them
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    anchors_only = name in NEEDS_ALIGNMENT and not seg_on_views
    terms = [WeightedTerm(AnchorSegLoss() if anchors_only else T.SegLoss(), 1.0)]
    if name in ("kd", "kd_aug", "skd"):
        terms.append(WeightedTerm(T.KD(), w_kd))
    if name == "at":
        terms.append(WeightedTerm(AttentionTransfer(), w_at))
    if name == "skd":
        terms.append(WeightedTerm(PairwiseAffinity(), w_pair))
    if name in NEEDS_ALIGNMENT:
        if tan is None or san is None:
            raise TedFlError(f"approach '{name}' needs the trained alignment networks (TAN and SAN)")
        if name in ("gkd", "intra", "intra_inter"):
            terms.append(WeightedTerm(DCGDIntra(tan, san, tau), w_intra))
        if name in ("gkd", "inter", "intra_inter"):
            terms.append(WeightedTerm(DCGDInter(tan, san, tau), w_inter))
        if name in ("gkd", "cross"):
            terms.append(WeightedTerm(DICD(tan, san, teacher_mode=TEACHER_MODE), w_cross))
    return Approach(name, LossConfig(teacher_mode=TEACHER_MODE), terms)


# ------------------------------------------------------------------------ batches
def sample_batches(images: np.ndarray, masks: np.ndarray, steps: int, batch_size: int, crop: int,
                   seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of random crops (crop <= 0: whole images), epoch-wise permutations of Generator(seed)."""
    n = len(images)
    if n == 0:
        raise TedFlError("cannot train on an empty split: the site has no training images")
    rng = np.random.default_rng(seed)  # one stream: each pass's permutation, then that pass's crops
    h, w = images.shape[-2:]
    for idx in batch_indices(n, batch_size, steps, rng):
        x, y = images[idx], masks[idx]
        if 0 < crop < min(h, w):
            xs, ys = [], []
            for j in range(len(idx)):
                r, c = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
                xs.append(x[j, :, r : r + crop, c : c + crop])
                ys.append(y[j, r : r + crop, c : c + crop])
            x, y = np.stack(xs), np.stack(ys)
        yield torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
