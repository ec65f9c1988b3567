"""The loss-concentration analysis (the paper's Figure 4): streamed histograms against an exact sorted computation,
the effect of γ on hard negatives, the prior π at initialisation, the figure and the table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retina.analysis import (
    LossConcentration,
    analyse_batches,
    format_table,
    loss_concentration_figure,
    per_anchor_losses,
)
from retina.config import ModelConfig
from retina.data.collate import collate_samples
from retina.model import build_retinanet
from retina.ops import sigmoid_focal_loss

GAMMAS = (0.0, 0.5, 1.0, 2.0)
FRACTIONS = (0.01, 0.05, 0.2)

# ------------------------------------------------------------------------------------------------ exact reference


def _exact_losses(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float):
    """Every anchor's loss from the project's reference focal loss: the true-class term of a foreground anchor,
    the sum over K of a background anchor's terms. → (positive (P,), negative (N,)) float64 numpy."""
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none", backend="reference")
    fg, bg = targets >= 0, targets == -1  # (B, A) bool
    pos = loss[fg].gather(1, targets[fg][:, None]).squeeze(1)  # (P,)
    neg = loss[bg].sum(-1)  # (N,)
    return pos.double().numpy(), neg.double().numpy()


def _exact_curve(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted easiest first; knots at k/N of the cumulative normalised loss."""
    c = np.cumsum(np.sort(losses))
    return np.arange(len(losses) + 1) / len(losses), np.concatenate([[0.0], c / c[-1]])


def _exact_share(losses: np.ndarray, fraction: float) -> float:
    return float(1.0 - np.interp(1.0 - fraction, *_exact_curve(losses)))


def _hand_made_batch(seed: int, batch: int, anchors: int, k: int = 3, positives: bool = True):
    """Logits with easy, medium and hard anchors → cls_logits (B, A, K) float32, cls_targets (B, A) int64."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors, k, generator=g) * 2.0 - 4.0  # (B, A, K): mostly confident background
    choice = torch.rand(batch, anchors, generator=g)
    # (B, A) int64: class index, -1 background, -2 ignored
    targets = torch.where(choice < 0.1, torch.full_like(choice, -2), torch.full_like(choice, -1)).long()
    if positives:
        fg = choice > 0.95
        targets[fg] = torch.randint(0, k, (int(fg.sum()),), generator=g)
        logits[fg] += 4.0 * torch.rand(int(fg.sum()), 1, generator=g)  # positives from hard to fairly easy
    return logits, targets


# ------------------------------------------------------------------------------------------------ streaming = exact


def test_streamed_histogram_matches_the_exact_sorted_computation():
    alpha = 0.25
    batches = [_hand_made_batch(seed, batch=2, anchors=n) for seed, n in enumerate((3000, 1700, 4100))]
    acc, parts = LossConcentration(GAMMAS, alpha), [LossConcentration(GAMMAS, alpha) for _ in range(2)]
    for i, (logits, targets) in enumerate(batches):  # one batch at a time: streaming
        acc.update(logits, targets)
        parts[min(i, 1)].update(logits, targets)
    result = acc.result(num_points=101)
    all_logits = torch.cat([lg.reshape(-1, 3) for lg, _ in batches])  # (ΣBA, K)
    all_targets = torch.cat([t.reshape(-1) for _, t in batches])  # (ΣBA,)
    assert result.num_ignored == int((all_targets == -2).sum()) > 0
    for gamma in GAMMAS:
        pos, neg = _exact_losses(all_logits, all_targets, gamma, alpha)
        for kind, exact in (("positive", pos), ("negative", neg)):
            stats = getattr(result.gamma(gamma), kind)
            assert stats.count == len(exact) and stats.total_loss == pytest.approx(exact.sum(), rel=1e-5)
            for f in FRACTIONS:
                got, want = stats.hardest_share[f], _exact_share(exact, f)
                assert abs(got - want) <= min(1e-3, stats.error_bound + 1e-5), (gamma, kind, f, got, want)
            want_y = np.interp(stats.x, *_exact_curve(exact))
            assert np.abs(np.array(stats.y) - want_y).max() <= min(1e-3, stats.error_bound + 1e-5)
    # two accumulators over disjoint parts of the split merge into the same histograms (up to summation order)
    merged = parts[0].merge(parts[1]).result(num_points=101)
    assert merged.num_ignored == result.num_ignored
    for gm, gr in zip(merged.per_gamma, result.per_gamma, strict=True):
        for kind in ("positive", "negative"):
            sm, sr = getattr(gm, kind), getattr(gr, kind)
            assert sm.count == sr.count and sm.total_loss == pytest.approx(sr.total_loss, rel=1e-12)
            assert np.allclose(sm.y, sr.y, rtol=0, atol=1e-12)


def test_coarse_bins_stay_within_the_documented_error_bound():
    """8 bins over [1e-3, 1): wide bins, and losses below and above the range: the binned curve lies on or above
    the exact one (the chord of a convex curve) by at most CurveStats.error_bound."""
    logits, targets = _hand_made_batch(7, batch=2, anchors=3000)
    acc = LossConcentration(GAMMAS, num_bins=8, min_loss=1e-3, max_loss=1.0)
    acc.update(logits, targets)
    result = acc.result(num_points=401)
    for gamma in GAMMAS:
        pos, neg = _exact_losses(logits, targets, gamma, 0.25)
        for kind, exact in (("positive", pos), ("negative", neg)):
            stats = getattr(result.gamma(gamma), kind)
            diff = np.array(stats.y) - np.interp(stats.x, *_exact_curve(exact))  # (401,) binned - exact
            assert diff.min() >= -1e-5 and diff.max() <= stats.error_bound + 1e-5, (gamma, kind)
            assert diff.max() > 1e-4  # the coarse bins do show: the check above is not vacuous


def test_no_positive_anchor_gives_nan_shares_and_still_a_table_and_negatives():
    acc = LossConcentration(GAMMAS)
    for seed in range(2):
        acc.update(*_hand_made_batch(seed, batch=1, anchors=2000, positives=False))
    result = acc.result()
    for g in result.per_gamma:
        assert g.positive.count == 0 and g.positive.total_loss == 0.0
        assert all(math.isnan(s) for s in g.positive.hardest_share.values()) and all(map(math.isnan, g.positive.y))
        assert g.negative.count > 0 and 0 < g.negative.hardest_share[0.01] < 1
    table = format_table(result)
    assert "P=0" in table and "n/a" in table and len(table.splitlines()) == 2 + len(GAMMAS)


def test_inputs_are_checked():
    acc = LossConcentration()
    logits = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="-2..1"):
        acc.update(logits, torch.tensor([[0, 1, 2, -1]]))  # class 2 of K = 2
    with pytest.raises(ValueError, match="NaN"):
        acc.update(torch.full((1, 4, 2), float("nan")), torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="minus K"):
        acc.update(logits, torch.full((1, 3), -1))


# ------------------------------------------------------------------------------------------------ the effect of γ


def test_hard_negatives_carry_more_of_the_loss_as_gamma_grows():
    """A trained-like negative distribution: 98 % very easy anchors (p ≈ 1e-3), 2 % hard ones (p ≈ 0.5)."""
    g = torch.Generator().manual_seed(0)
    n, k = 20000, 4
    logits = torch.randn(n, k, generator=g) - 7.0  # (N, K) easy background
    hard = torch.rand(n, generator=g) < 0.02
    logits[hard, 0] = 1.5 * torch.randn(int(hard.sum()), generator=g)  # one confused class per hard anchor
    acc = LossConcentration(GAMMAS)
    acc.update(logits[None], torch.full((1, n), -1))  # (1, N) all background
    shares = [acc.share_of_hardest(0.01, gamma) for gamma in GAMMAS]
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False)), shares
    assert shares[0] < 0.7 and shares[-1] > 0.9, shares  # CE spreads the loss; γ = 2 puts ~all on the hardest 1 %
    assert acc.share_of_hardest(0.2, 0.0) < acc.share_of_hardest(0.05, 2.0)


def test_alpha_only_scales_the_totals():
    logits, targets = _hand_made_batch(3, batch=1, anchors=3000)
    a, b = LossConcentration(GAMMAS, alpha=0.25), LossConcentration(GAMMAS, alpha=0.75)
    a.update(logits, targets)
    b.update(logits, targets)
    ra, rb = a.result(), b.result()
    for ga, gb in zip(ra.per_gamma, rb.per_gamma, strict=True):
        assert gb.positive.total_loss == pytest.approx(3 * ga.positive.total_loss, rel=1e-6)
        assert gb.negative.total_loss == pytest.approx(ga.negative.total_loss / 3, rel=1e-6)
        # α·loss rounded in fp32 may cross a bin edge: the shares agree to within the binning's error bound
        for f in FRACTIONS:
            for kind in ("positive", "negative"):
                sa, sb = getattr(ga, kind), getattr(gb, kind)
                assert sb.hardest_share[f] == pytest.approx(sa.hardest_share[f], abs=sa.error_bound + sb.error_bound)


# ------------------------------------------------------------------------------------------------ over a model


def _tiny_model(prior: float = 0.01, gamma: float = 2.0, seed: int = 0):
    """resnet10 at width 16 with a 32-channel FPN and one conv per subnet: a RetinaNet that runs in milliseconds."""
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.name, cfg.backbone.width, cfg.backbone.norm = "resnet10", 16, "bn"
    cfg.backbone.trainable_layers, cfg.backbone.fpn_channels = 5, 32
    cfg.head.num_convs, cfg.head.prior = 1, prior
    cfg.anchors.sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
    cfg.loss.gamma = gamma
    cfg.input.min_size, cfg.input.max_size = 128, 128
    torch.manual_seed(seed)
    return build_retinanet(cfg)


def _batch(seed: int, num_images: int = 2) -> dict[str, torch.Tensor]:
    """A collated batch (the data pipeline's contract) of random 128 × 128 images with 1-3 boxes each."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_images):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 80, size=(n, 2))
        wh = rng.uniform(12, 48, size=(n, 2))
        samples.append({
            "image": rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8),  # (h, w, 3) uint8
            "image_size": (128, 128), "orig_size": (128, 128), "image_id": seed * 10 + i,
            "boxes": np.concatenate([xy, xy + wh], axis=1).astype(np.float32),  # (n, 4) xyxy
            "labels": rng.integers(0, 3, size=n),  # (n,) contiguous labels
        })  # fmt: skip
    return collate_samples(samples)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_prior_half_lets_the_background_dominate_the_initial_loss(gamma):
    """Paper §3.3: with π = 0.5 the many easy background anchors swamp the loss at the first iteration."""
    batch = _batch(0)
    losses = {}
    for prior in (0.5, 0.01):
        model = _tiny_model(prior, gamma).eval()  # same seed: the same weights, only the class bias differs
        with torch.no_grad():
            out = model.losses(batch["images"], batch["gt_boxes"], batch["gt_labels"])
            cls_logits, cls_targets = model.classification_targets(
                batch["images"], batch["gt_boxes"], batch["gt_labels"]
            )
        # classification_targets sees exactly what the training loss sees
        num_fg = (cls_targets >= 0).sum().clamp(min=1)
        direct = sigmoid_focal_loss(cls_logits, cls_targets, alpha=0.25, gamma=gamma, backend="reference") / num_fg
        assert direct.item() == pytest.approx(out["loss_cls"].item(), rel=1e-4)
        losses[prior] = out["loss_cls"].item()
    assert losses[0.5] >= 10 * losses[0.01], losses


def test_analyse_batches_runs_in_eval_mode_and_restores_each_module_mode():
    model = _tiny_model().train()
    model.head.box_subnet.eval()  # a caller's mixed modes must come back as they were
    running_mean = model.backbone.body.bn1.running_mean.clone()
    batches = [_batch(1), _batch(2)]
    result = analyse_batches(model, batches, GAMMAS, "cpu")
    assert model.training and model.backbone.body.bn1.training and not model.head.box_subnet.training
    assert torch.equal(model.backbone.body.bn1.running_mean, running_mean)  # eval mode: BN statistics untouched
    model.eval()  # the reference below: BN with running statistics; train-mode batch statistics would differ
    with torch.no_grad():
        outputs = [model.classification_targets(b["images"], b["gt_boxes"], b["gt_labels"]) for b in batches]
    for gamma in GAMMAS:
        pos = sum(float(per_anchor_losses(lg, t, [gamma], model.cfg.loss.alpha)[0][0].sum()) for lg, t in outputs)
        neg = sum(float(per_anchor_losses(lg, t, [gamma], model.cfg.loss.alpha)[0][1].sum()) for lg, t in outputs)
        stats = result.gamma(gamma)
        assert stats.positive.count > 0 and stats.positive.total_loss == pytest.approx(pos, rel=1e-5)
        assert stats.negative.total_loss == pytest.approx(neg, rel=1e-5)
    # the analysed losses partition the training class loss, less the K - 1 background terms of each foreground
    # anchor that the positive curve leaves out
    lg, t = outputs[0]
    per_class = sigmoid_focal_loss(lg, t, alpha=0.25, gamma=2.0, reduction="none", backend="reference")  # (B, A, K)
    other_terms = (t[..., None] >= 0) & (t[..., None] != torch.arange(lg.shape[-1]))  # (B, A, K) bool
    pos, neg = per_anchor_losses(lg, t, [2.0], 0.25)[0]
    analysed = pos.sum() + neg.sum() + per_class[other_terms].sum()
    assert analysed.item() == pytest.approx(per_class.sum().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------ presentation


def test_figure_has_two_panels_with_one_line_per_gamma():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = LossConcentration(GAMMAS)
    acc.update(*_hand_made_batch(0, batch=1, anchors=2000))
    result = acc.result()
    fig = loss_concentration_figure(result)
    try:
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert len(ax.lines) == len(GAMMAS)
            assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"γ = {g:g}" for g in GAMMAS]
        assert "negative" in fig.axes[1].get_title()
    finally:
        plt.close(fig)
    assert format_table(result).splitlines()[0].split("|")[1].strip().startswith("negatives")
