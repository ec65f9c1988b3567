"""The compiled Triton focal-loss kernel on CUDA: parity with the fp64 reference and determinism (``gpu`` mark).

Stage 1 of benchmarks/gpu_check.py runs these with ``pytest -m gpu``; without a CUDA device they skip.

Parity: the kernel (``backend="triton"``, CUDA tensors) against the fp64 torchvision oracle of
tests/retina/_focal_helpers.py for γ ∈ {0, 0.5, 2, 5}, α ∈ {0.25, -1}, fp32/bf16/fp16 logits, K ∈ {1, 80, 81}, every
reduction, N(-1, 3) logits with ±100 planted (in background and in foreground columns) and ~10 % ignored rows.
The oracle sees the very same (rounded) logits in fp64, so for bf16/fp16 only the rounding of the outputs adds
to the fp32 kernel's own error. Tolerances, elementwise: ``rtol·|ref| + atol`` with rtol 2e-5 (the GPU's exp2 and
log2 are approximate: ~2 ulp relative for exp2, ~2^-22 absolute for log2 near 1) plus two roundings of the
output dtype (the gradient is rounded in the forward and again when the backward scales it), atol 1e-6 (× 1/N
for "mean"). Where the fp64 autograd oracle is itself NaN (0·inf in ``(1 - p_t)^γ``'s derivative for γ < 1 at
saturated logits, where the true derivative is below 1e-40) the kernel must return a finite ~0.
"""

from __future__ import annotations

import pytest
import torch

from retina.ops import sigmoid_focal_loss
from tests.retina._focal_helpers import make_inputs, oracle, run_op

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GAMMAS = (0.0, 0.5, 2.0, 5.0)
ALPHAS = (0.25, -1.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_CLASSES = (1, 80, 81)
REDUCTIONS = ("sum", "mean", "none")
LEAD = (2, 3001)  # 6002 anchor rows: many programs, and not a multiple of any BLOCK_R
RTOL, ATOL = 2e-5, 1e-6


def extreme_inputs(num_classes: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU logits [*LEAD, K] in `dtype` with ±100 planted, and labels [*LEAD] (class, -1 background, -2 ignored)."""
    logits, labels = make_inputs(LEAD, num_classes, dtype=dtype, seed=seed)
    flat = logits.view(-1)
    flat[::7] = 100.0  # saturated background columns (and some foreground ones), both signs
    flat[3::11] = -100.0
    fg = (labels >= 0).nonzero()  # [n, 2] foreground rows: saturate their own class column too
    for i, (b, a) in enumerate(fg[::3].tolist()):
        logits[b, a, labels[b, a]] = 100.0 if i % 2 else -100.0
    return logits, labels


def _tolerance(ref: torch.Tensor, out_dtype: torch.dtype, scale: float) -> torch.Tensor:
    info = torch.finfo(out_dtype)
    if out_dtype in (torch.float32, torch.float64):
        return RTOL * ref.abs() + ATOL * scale
    # two roundings to the output dtype, relative (eps) and, below its normal range, absolute (the subnormal
    # spacing: fp16's mean gradients of ~3e-8 round to 0 or 6e-8)
    return (RTOL + 2 * info.eps) * ref.abs() + ATOL * scale + 2 * info.tiny * info.eps


def assert_close(actual: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype, scale: float, what: str) -> None:
    """Elementwise within `_tolerance`; NaN oracle entries (see the module docstring) need a finite ~0."""
    actual = actual.cpu().double()
    assert actual.shape == ref.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    defined = torch.isfinite(ref)
    assert (actual[~defined].abs() <= 1e-30).all(), f"{what}: not ~0 where the true value is below 1e-40"
    err = (actual[defined] - ref[defined]).abs()
    excess = err - _tolerance(ref[defined], out_dtype, scale)
    worst = int(excess.argmax())
    assert excess.max() <= 0, f"{what}: error {err[worst]:.3e} at ref {ref[defined][worst]:.6e} over tolerance"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_parity_with_fp64_reference(dtype, num_classes, reduction):
    logits, labels = extreme_inputs(num_classes, dtype, seed=num_classes)
    scale = 1.0 / logits.numel() if reduction == "mean" else 1.0
    loss_dtype = dtype if reduction == "none" else torch.float32  # sum/mean: an fp32 scalar for every dtype
    for gamma in GAMMAS:
        for alpha in ALPHAS:
            params = dict(alpha=alpha, gamma=gamma, reduction=reduction)
            loss, grad = run_op(logits.cuda(), labels.cuda(), backend="triton", **params)
            ref_loss, ref_grad = oracle(logits, labels, **params)
            where = f"γ={gamma} α={alpha} {reduction} {dtype} K={num_classes}"
            assert loss.dtype == loss_dtype and grad.dtype == dtype, where
            # a sum's error is at most the sum of its terms' errors (all terms are >= 0)
            loss_scale = scale * (logits.numel() if reduction != "none" else 1.0)
            assert_close(loss, ref_loss, loss_dtype, loss_scale, f"loss, {where}")
            assert_close(grad, ref_grad, dtype, scale, f"grad, {where}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_two_calls_are_bitwise_equal(dtype):
    logits, labels = make_inputs((4, 30011), 80, dtype=dtype, seed=21, fg=0.01, ignored=0.05)
    logits, labels = logits.cuda(), labels.cuda()
    for gamma, alpha, reduction in [(2.0, 0.25, "sum"), (0.5, -1.0, "mean"), (5.0, 0.25, "none")]:
        params = dict(alpha=alpha, gamma=gamma, reduction=reduction, backend="triton")
        first, second = run_op(logits, labels, **params), run_op(logits, labels, **params)
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), (gamma, alpha, reduction)


def test_default_backend_on_cuda_is_the_kernel():
    from retina.ops import focal_loss_triton

    logits, labels = make_inputs((2, 1000), 80, seed=22)
    before = focal_loss_triton.LAUNCHES["loss_and_grad"]
    loss = sigmoid_focal_loss(logits.cuda(), labels.cuda())  # backend "auto": CUDA tensors -> Triton
    assert focal_loss_triton.LAUNCHES["loss_and_grad"] == before + 1
    assert loss.is_cuda and loss.dtype == torch.float32
