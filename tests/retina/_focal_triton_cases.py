"""Triton-kernel cases, run by tests/retina/test_focal_loss_triton.py in a subprocess with ``TRITON_INTERPRET=1``.

They call the public op with ``backend="triton"`` on CPU tensors, so the kernel itself (interpreted by Triton on
NumPy) runs the same parity checks as the CUDA build would; ``test_kernel_really_ran`` proves no fallback ran.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from retina.ops import sigmoid_focal_loss
from tests.retina import _focal_helpers as fh

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

ROWS = 203  # not a multiple of BLOCK_R (32..128)


@pytest.mark.parametrize("num_classes", fh.NUM_CLASSES)
@pytest.mark.parametrize("reduction", fh.REDUCTIONS)
def test_parity(num_classes, reduction):
    logits, labels = fh.make_inputs((ROWS,), num_classes, seed=num_classes)
    for gamma in fh.GAMMAS:
        for alpha in fh.ALPHAS:
            fh.assert_close_to_oracle(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction, backend="triton")


def test_bf16_within_its_precision():
    logits, labels = fh.make_inputs((2, ROWS), 80, dtype=torch.bfloat16, seed=2)
    eps = torch.finfo(torch.bfloat16).eps
    fh.assert_close_to_oracle(logits, labels, alpha=0.25, gamma=2.0, reduction="sum", backend="triton", grad_rtol=eps)
    assert sigmoid_focal_loss(logits, labels, backend="triton").dtype == torch.float32


def test_non_contiguous_logits_read_through_strides():
    base, labels = fh.make_inputs((2, 150), 162, seed=5)
    strided = base[..., ::2]  # column stride 2, no copy
    fh.assert_close_to_oracle(strided, labels, alpha=0.25, gamma=2.0, reduction="sum", backend="triton")
    transposed = fh.make_inputs((81,), ROWS, seed=6)[0].t()  # [ROWS, 81] with row stride 1
    labels = fh.make_inputs((ROWS,), 81, seed=6)[1]
    fh.assert_close_to_oracle(transposed, labels, alpha=0.5, gamma=0.5, reduction="none", backend="triton")


def test_all_ignored_and_no_foreground():
    logits, labels = fh.make_inputs((ROWS,), 80, seed=8)
    loss, grad = fh.run_op(logits, torch.full_like(labels, -2), backend="triton")
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    background = torch.where(labels == -2, labels, torch.full_like(labels, -1))
    fh.assert_close_to_oracle(logits, background, alpha=0.25, gamma=2.0, reduction="mean", backend="triton")


@pytest.mark.parametrize("gamma", fh.GAMMAS)
def test_extreme_logits_are_finite(gamma):
    logits = torch.tensor([[-100.0, 100.0, 0.0]] * 4)
    labels = torch.tensor([0, 1, -1, -2])
    loss, grad = fh.run_op(logits, labels, gamma=gamma, reduction="none", backend="triton")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    eager_loss, eager_grad = fh.run_op(logits, labels, gamma=gamma, reduction="none", backend="eager")
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-6)


def test_gradcheck_fp64():
    logits, labels = fh.make_inputs((4, 5), 3, dtype=torch.float64, seed=10, fg=0.3, ignored=0.2)
    for gamma, alpha, reduction in [(2.0, 0.25, "sum"), (0.5, -1.0, "mean"), (0.0, 0.5, "none"), (1.5, 0.25, "sum")]:
        fn = functools.partial(
            sigmoid_focal_loss, labels=labels, alpha=alpha, gamma=gamma, reduction=reduction, backend="triton"
        )
        assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def test_bitwise_deterministic():
    logits, labels = fh.make_inputs((3, 700), 81, seed=11)
    first = fh.run_op(logits, labels, backend="triton")
    second = fh.run_op(logits, labels, backend="triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_kernel_really_ran():
    from triton.runtime.interpreter import InterpretedFunction

    from retina.ops import focal_loss_triton

    assert isinstance(focal_loss_triton._focal_loss_fwd_kernel, InterpretedFunction)
    before = focal_loss_triton.LAUNCHES["loss_and_grad"]
    logits, labels = fh.make_inputs((ROWS,), 80, seed=12)
    sigmoid_focal_loss(logits, labels, backend="triton")
    assert focal_loss_triton.LAUNCHES["loss_and_grad"] == before + 1
