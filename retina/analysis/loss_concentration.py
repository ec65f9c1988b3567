"""Where the classification loss of a detector comes from: the paper's Figure 4 (Lin et al. 2017, §5.1).

The paper takes a converged model (trained with γ = 2), evaluates the focal loss FL(p_t) with several γ on that
model's probabilities for ~10^7 negative and ~10^5 positive anchors, normalises each curve's losses to sum to one,
sorts them from the lowest to the highest loss and plots the cumulative normalised loss against the fraction of
samples. At γ = 2 nearly all of the negative loss comes from a small fraction of hard negatives; at γ = 0 (cross
entropy) it is spread over the easy majority.

What one example's loss is (each anchor is one example of the figure):

- a foreground anchor (target class c): the true-class term only, FL(p_t) with p_t = sigmoid(x_c). The paper
  plots the per-example loss FL(p_t) of the positive examples; the other K - 1 outputs of a foreground anchor are
  background predictions of a positive window and would mix easy-negative behaviour into the positive curve.
- a background anchor: the sum over its K outputs of the background term FL(p_t), p_t = 1 - sigmoid(x_k). That
  sum is exactly what the anchor adds to the training loss, so the negative curve splits the negatives' share of
  the training loss among the anchors. (The max over K would not sum to a loss at all.)
- ignored anchors (IoU between the matcher's thresholds) carry no loss in training and are left out; only counted.

α: Figure 4's model was trained with γ = 2, which the paper pairs with α = 0.25; α = 0.25 is applied here by default
(``analyse_batches``: the model's own cfg.loss.alpha). α weights the true-class term and 1 - α the background
terms; α < 0 disables it, as in ``retina.ops.sigmoid_focal_loss``.
Within one curve every example carries the same factor (α for positives, 1 - α for negatives), so α cancels in
the normalised curves and in the shares; it only scales the reported total losses.

Streaming: per (γ, positive/negative) a fixed histogram over log-spaced loss bins keeps, in float64, the count and
the loss sum of each bin, so memory is bounded by one batch whatever the number of anchors. Bin layout: bin 0 =
losses exactly 0, bin 1 = (0, min_loss), bins 2..num_bins+1 = log-spaced [e_i, e_i·r) over [min_loss, max_loss)
with r = (max_loss / min_loss)^(1 / num_bins), last bin = [max_loss, ∞). Defaults: 8192 bins over [1e-15, 1e3]
(r - 1 ≈ 0.5 %); a converged γ = 2 model's easy background anchors reach losses of ~p^3 ≈ 1e-12 and below, and a
loss above 1e3 needs a logit beyond ±1e3. Only the per-anchor losses of the current batch are materialised.

Curves (x: fraction of anchors sorted from the EASIEST at x = 0 to the hardest at x = 1, as in the paper; y: the
cumulative normalised loss of the easiest x): the anchors of one bin are taken as equal to the bin's mean, so the
curve is linear inside a bin and exact at every bin boundary (counts and sums are exact there). Error bound: at
any x only one bin is cut, and the k easiest of its n losses (all within a factor r of each other) sum to between
k·mean/r and k·mean, so 0 <= y_binned(x) - y_exact(x) <= (1 - 1/r) · (that bin's share of the curve's loss):
the binned curve is the chord of the convex exact curve across the bin, never below it, so the hardest shares are
never overestimated. For the zero bin the error is 0, for the two open-ended bins at most their share.
``CurveStats.error_bound`` is the largest of these over the bins, an a-posteriori bound on the curve and on every
share (with the defaults 1 - 1/r = 0.50 % times the largest bin's share, itself small unless the losses cluster;
on 10^4 spread-out anchors the bound is ~1e-4 and the actual error ~1e-6). "The exact curve" interpolates
linearly between the sorted cumulative sums at k/N, so a fraction f·N that is not a whole number of anchors
takes a fractional anchor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BACKGROUND = -1
IGNORE = -2
KINDS = ("positive", "negative")  # index 0 / 1 of the histograms' second axis
DEFAULT_GAMMAS = (0.0, 0.5, 1.0, 2.0)
DEFAULT_FRACTIONS = (0.01, 0.05, 0.2)
_MODEL_INPUTS = ("images", "gt_boxes", "gt_labels")  # the collated batch's keys that the class loss reads


@dataclass(frozen=True)
class CurveStats:
    """One curve (one γ, positive or negative anchors). NaN shares and curve when there is no loss to normalise."""

    count: int  # anchors
    total_loss: float  # sum of their losses (with α applied)
    hardest_share: dict[float, float]  # fraction f → share of the total loss carried by the hardest f of anchors
    error_bound: float  # bound on |binned - exact| for the curve's y and for every share (see the module docstring)
    x: list[float]  # fraction of anchors, easiest first, 0..1
    y: list[float]  # cumulative normalised loss of the easiest x, 0..1


@dataclass(frozen=True)
class GammaConcentration:
    gamma: float
    positive: CurveStats
    negative: CurveStats


@dataclass(frozen=True)
class LossConcentrationResult:
    alpha: float
    fractions: tuple[float, ...]
    num_ignored: int  # anchors between the matcher's thresholds: no loss, in no curve
    per_gamma: tuple[GammaConcentration, ...]

    def gamma(self, gamma: float) -> GammaConcentration:
        for g in self.per_gamma:
            if g.gamma == gamma:
                return g
        raise KeyError(f"γ = {gamma} was not analysed; have {[g.gamma for g in self.per_gamma]}")

    def to_dict(self) -> dict:
        """Plain lists, dicts and numbers (JSON- and MLflow-friendly)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ per-anchor loss


def per_anchor_losses(
    cls_logits: torch.Tensor, cls_targets: torch.Tensor, gammas: Sequence[float], alpha: float = 0.25
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """cls_logits (..., K); cls_targets (...) int64 (class index, -1 background, -2 ignored) → per γ
    (positive losses (P,), negative losses (N,)) float32, one value per non-ignored anchor (module docstring)."""
    _check_inputs(cls_logits, cls_targets)
    logits = cls_logits.detach().float()  # (..., K): the loss in fp32 even for bf16/fp16 logits
    foreground = cls_targets >= 0  # (...) bool
    pos_logits = logits[foreground].gather(1, cls_targets[foreground][:, None]).squeeze(1)  # (P,) true-class logit
    neg_logits = logits[cls_targets == BACKGROUND]  # (N, K)
    w_pos, w_neg = (alpha, 1.0 - alpha) if alpha >= 0 else (1.0, 1.0)
    # FL = -log(p_t) · (1 - p_t)^γ = softplus(∓x) · exp(γ · logsigmoid(∓x)), upper sign for the true class:
    # accurate for any finite logit, where 1 - sigmoid(x) would cancel to 0 for confident outputs
    pos_ce, pos_log_q = F.softplus(-pos_logits), F.logsigmoid(-pos_logits)  # (P,), log(1 - p)
    neg_ce, neg_log_p = F.softplus(neg_logits), F.logsigmoid(neg_logits)  # (N, K), log p
    out = []
    for gamma in gammas:
        pos = w_pos * pos_ce * torch.exp(gamma * pos_log_q)  # (P,)
        neg = w_neg * (neg_ce * torch.exp(gamma * neg_log_p)).sum(dim=-1)  # (N,) summed over the K classes
        out.append((pos, neg))
    return out


def _check_inputs(cls_logits: torch.Tensor, cls_targets: torch.Tensor) -> None:
    if not cls_logits.is_floating_point() or cls_logits.dim() < 1:
        raise TypeError(f"cls_logits must be a floating point (..., K) tensor, got {cls_logits.dtype}")
    if cls_targets.is_floating_point() or cls_targets.dtype == torch.bool:
        raise TypeError(f"cls_targets must be an integer tensor, got {cls_targets.dtype}")
    if cls_targets.shape != cls_logits.shape[:-1]:
        raise ValueError(f"cls_targets {tuple(cls_targets.shape)} must be cls_logits {tuple(cls_logits.shape)} minus K")
    k = cls_logits.shape[-1]
    if cls_targets.numel() and (int(cls_targets.min()) < IGNORE or int(cls_targets.max()) >= k):
        raise ValueError(f"cls_targets must be in -2..{k - 1} (-2 ignored, -1 background, class index)")
    if not torch.isfinite(cls_logits).all():
        raise ValueError("cls_logits hold NaN or infinite values")


# ------------------------------------------------------------------------------------------------ histograms


def _bin_index(losses: torch.Tensor, log_min: float, log_step: float, num_bins: int) -> torch.Tensor:
    """losses (n,) >= 0 → (n,) int64 bin: 0 exact zero, 1 below min_loss, 2.. log bins, num_bins + 2 overflow."""
    x = losses.double()
    pos = torch.floor((torch.log10(x.clamp_min(1e-300)) - log_min) / log_step)  # (n,) log bin, maybe out of range
    index = pos.clamp(-1, num_bins).long() + 2  # clamp before the cast: out-of-range floats have no int64
    return torch.where(x > 0, index, torch.zeros_like(index))


def _lorenz_knots(counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-bin counts and loss sums (bins in increasing loss) → the curve's knots (x, y) at the bin boundaries;
    None when there is no loss to normalise."""
    keep = counts > 0
    c, s = counts[keep].astype(np.float64), sums[keep]
    if c.sum() == 0 or not s.sum() > 0:
        return None
    x = np.concatenate([[0.0], np.cumsum(c) / c.sum()])
    y = np.concatenate([[0.0], np.cumsum(s) / s.sum()])
    x[-1] = y[-1] = 1.0  # exact ends despite rounding in the cumulative sums
    return x, y


class LossConcentration:
    """Streaming accumulator of the per-anchor focal loss distribution, per γ, for positive and negative anchors.

    ``update(cls_logits, cls_targets)`` once per batch; then ``share_of_hardest``, ``curve(s)`` or ``result()``.
    Accumulators of disjoint parts of a split (e.g. data-parallel workers) combine with ``merge``.
    """

    def __init__(
        self,
        gammas: Sequence[float] = DEFAULT_GAMMAS,
        alpha: float = 0.25,
        *,
        num_bins: int = 8192,
        min_loss: float = 1e-15,
        max_loss: float = 1e3,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ):
        self.gammas = tuple(float(g) for g in gammas)
        if not self.gammas or any(not (math.isfinite(g) and g >= 0) for g in self.gammas):
            raise ValueError(f"gammas must be finite numbers >= 0, got {gammas}")
        if len(set(self.gammas)) != len(self.gammas):
            raise ValueError(f"gammas must be distinct, got {gammas}")
        if not (num_bins >= 1 and 0 < min_loss < max_loss < math.inf):
            raise ValueError("need num_bins >= 1 and 0 < min_loss < max_loss < inf")
        self.fractions = tuple(float(f) for f in fractions)
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1], got {fractions}")
        self.alpha = float(alpha)
        self.num_bins, self.min_loss, self.max_loss = num_bins, float(min_loss), float(max_loss)
        self._log_min = math.log10(min_loss)
        self._log_step = (math.log10(max_loss) - self._log_min) / num_bins
        self.bin_ratio = 10.0**self._log_step  # r: largest / smallest loss inside one log bin
        shape = (len(self.gammas), len(KINDS), num_bins + 3)  # (G, 2, bins)
        self._counts = torch.zeros(shape, dtype=torch.int64)  # exact counts
        self._sums = torch.zeros(shape, dtype=torch.float64)  # loss sums: float64 keeps 10^7 small terms exact enough
        self.num_ignored = 0

    @torch.no_grad()
    def update(self, cls_logits: torch.Tensor, cls_targets: torch.Tensor) -> None:
        """Add one batch: cls_logits (B, A, K) (any leading shape); cls_targets (B, A) int64 (class index 0..K-1,
        -1 background, -2 ignored), as ``retina.losses.assign_targets`` makes them."""
        if self._counts.device != cls_logits.device:
            # the histograms live where the logits are, so a batch's bincount needs no host round trip
            self._counts, self._sums = self._counts.to(cls_logits.device), self._sums.to(cls_logits.device)
        per_gamma = per_anchor_losses(cls_logits, cls_targets, self.gammas, self.alpha)
        size = self.num_bins + 3
        for g, losses in enumerate(per_gamma):
            for kind, values in enumerate(losses):
                index = _bin_index(values, self._log_min, self._log_step, self.num_bins)  # (n,)
                self._counts[g, kind] += torch.bincount(index, minlength=size)
                self._sums[g, kind] += torch.bincount(index, weights=values.double(), minlength=size)
        self.num_ignored += int((cls_targets == IGNORE).sum())

    def merge(self, other: LossConcentration) -> LossConcentration:
        """Add another accumulator with the same settings (another part of the split) into this one."""
        same = (self.gammas, self.alpha, self.num_bins, self.min_loss, self.max_loss)
        if same != (other.gammas, other.alpha, other.num_bins, other.min_loss, other.max_loss):
            raise ValueError("can only merge accumulators with the same gammas, alpha and bins")
        self._counts += other._counts.to(self._counts.device)
        self._sums += other._sums.to(self._sums.device)
        self.num_ignored += other.num_ignored
        return self

    def _histogram(self, gamma: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """(counts, sums) of one curve as numpy arrays, bins in increasing loss."""
        if gamma not in self.gammas:
            raise KeyError(f"γ = {gamma} is not accumulated; have {self.gammas}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        g, k = self.gammas.index(gamma), KINDS.index(kind)
        return self._counts[g, k].cpu().numpy(), self._sums[g, k].cpu().numpy()

    def share_of_hardest(self, fraction: float, gamma: float = 2.0, kind: str = "negative") -> float:
        """Share of the total loss of `kind` anchors carried by the hardest `fraction` of them; NaN without loss."""
        knots = _lorenz_knots(*self._histogram(gamma, kind))
        if knots is None:
            return math.nan
        return float(1.0 - np.interp(1.0 - fraction, *knots))

    def curve(self, gamma: float, kind: str, num_points: int = 201) -> tuple[np.ndarray, np.ndarray]:
        """x (num_points,) uniform in 0..1, fraction of anchors easiest first; y (num_points,) the cumulative
        normalised loss (NaN without loss)."""
        x = np.linspace(0.0, 1.0, num_points)
        knots = _lorenz_knots(*self._histogram(gamma, kind))
        return x, (np.interp(x, *knots) if knots is not None else np.full_like(x, np.nan))

    def curves(self, num_points: int = 201) -> dict[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """γ → {"positive": (x, y), "negative": (x, y)}: the data of the paper's two panels."""
        return {g: {kind: self.curve(g, kind, num_points) for kind in KINDS} for g in self.gammas}

    def error_bound(self, gamma: float, kind: str) -> float:
        """A-posteriori bound on |binned - exact| of the curve and the shares (module docstring)."""
        counts, sums = self._histogram(gamma, kind)
        total = sums.sum()
        if counts.sum() == 0 or not total > 0:
            return math.nan
        share = sums / total  # (bins,) each bin's share of the loss
        log_bins = share[2 : self.num_bins + 2].max(initial=0.0) * (1.0 - 1.0 / self.bin_ratio)
        return float(max(log_bins, share[1], share[-1]))  # the zero bin (share[0] = 0) is exact

    def _stats(self, gamma: float, kind: str, num_points: int) -> CurveStats:
        counts, sums = self._histogram(gamma, kind)
        x, y = self.curve(gamma, kind, num_points)
        return CurveStats(
            count=int(counts.sum()),
            total_loss=float(sums.sum()),
            hardest_share={f: self.share_of_hardest(f, gamma, kind) for f in self.fractions},
            error_bound=self.error_bound(gamma, kind),
            x=x.tolist(),
            y=y.tolist(),
        )

    def result(self, num_points: int = 201) -> LossConcentrationResult:
        """Counts, totals, hardest-fraction shares and `num_points` curve points per γ and kind."""
        per_gamma = tuple(
            GammaConcentration(g, self._stats(g, "positive", num_points), self._stats(g, "negative", num_points))
            for g in self.gammas
        )
        return LossConcentrationResult(self.alpha, self.fractions, self.num_ignored, per_gamma)


# ------------------------------------------------------------------------------------------------ over a model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside (BatchNorm uses its running statistics, as at inference); every module's own mode after,
    so a caller's mixed modes (some parts frozen in eval) come back as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def analyse_batches(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    device: torch.device | str | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    *,
    alpha: float | None = None,
    num_points: int = 201,
    **options,
) -> LossConcentrationResult:
    """Run `model` (a ``retina.model.RetinaNet``, already on `device`) over collated batches (the contract of
    ``retina.data.collate``: "images", "gt_boxes", "gt_labels", ...) in eval mode and analyse its class outputs.

    Logits and anchor targets come from ``RetinaNet.classification_targets``: the same head outputs and matcher
    as the training loss. `device`: where the batches go (default: the model's). `autocast`: the training's
    autocast context (e.g. ``torch.autocast("cuda", torch.bfloat16)``), to see the logits training saw. `alpha`:
    default the model's ``cfg.loss.alpha``. `options`: ``num_bins``, ``min_loss``, ``max_loss``, ``fractions``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc = LossConcentration(gammas, model.cfg.loss.alpha if alpha is None else alpha, **options)
    with _eval_mode(model):
        for batch in batches:
            images, gt_boxes, gt_labels = (batch[k].to(device, non_blocking=True) for k in _MODEL_INPUTS)
            with autocast or contextlib.nullcontext():
                cls_logits, cls_targets = model.classification_targets(images, gt_boxes, gt_labels)
            acc.update(cls_logits, cls_targets)
    return acc.result(num_points)
