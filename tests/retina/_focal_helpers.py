"""Shared by the focal-loss tests (in-process and the Triton-interpreter subprocess): inputs and the oracle.

The oracle is ``torchvision.ops.sigmoid_focal_loss`` in fp64 on dense one-hot targets with the ignored rows
removed, i.e. an independent formulation of the same loss, not our own formula.
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

from retina.ops import sigmoid_focal_loss

GAMMAS = (0.0, 0.5, 1.0, 2.0, 5.0)
ALPHAS = (0.25, 0.5, -1.0)
REDUCTIONS = ("sum", "mean", "none")
NUM_CLASSES = (1, 3, 80, 81)


def make_inputs(
    lead_shape: tuple[int, ...],
    num_classes: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    fg: float = 0.1,
    ignored: float = 0.1,
    scale: float = 3.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits ``[*lead_shape, K]`` ~ N(-1, scale) and labels ``[*lead_shape]`` with fg/ignored fractions."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead_shape, num_classes, generator=gen) * scale - 1.0).to(dtype)
    u = torch.rand(lead_shape, generator=gen)
    classes = torch.randint(0, num_classes, lead_shape, generator=gen)
    labels = torch.where(u < fg, classes, torch.full_like(classes, -1))  # -1 background
    labels = torch.where(u > 1.0 - ignored, torch.full_like(classes, -2), labels)  # -2 ignored
    return logits, labels


def oracle(
    logits: torch.Tensor, labels: torch.Tensor, *, alpha: float, gamma: float, reduction: str, grad_out=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d(loss · grad_out)/dlogits) in fp64 from torchvision's formula; ignored rows loss 0, grad 0."""
    num_classes = logits.shape[-1]
    x = logits.detach().to(torch.float64).reshape(-1, num_classes).requires_grad_()
    lab = labels.reshape(-1)
    keep = lab != -2
    onehot = (lab[:, None] == torch.arange(num_classes)).to(torch.float64)  # [R, K] dense targets
    kept = tv_sigmoid_focal_loss(x[keep], onehot[keep], alpha=alpha, gamma=gamma, reduction="none")
    full = torch.zeros_like(x).index_put((keep.nonzero()[:, 0],), kept)  # ignored rows stay 0
    if reduction == "sum":
        loss = full.sum()
    elif reduction == "mean":
        loss = full.mean()
    else:
        loss = full.reshape(logits.shape)
    weight = torch.ones_like(loss) if grad_out is None else grad_out.to(torch.float64)
    (grad,) = torch.autograd.grad((loss * weight).sum(), x)
    return loss.detach(), grad.reshape(logits.shape)


def run_op(logits, labels, *, grad_out=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits.grad) of ``sigmoid_focal_loss`` for a fresh leaf copy of ``logits`` (strides kept)."""
    x = logits.detach().clone() if logits.is_contiguous() else logits.detach()
    x.requires_grad_()
    loss = sigmoid_focal_loss(x, labels, **kwargs)
    weight = torch.ones_like(loss) if grad_out is None else grad_out
    (loss * weight).sum().backward()
    return loss.detach(), x.grad


def assert_close_to_oracle(
    logits, labels, *, alpha: float, gamma: float, reduction: str, backend: str, loss_rtol=1e-6, grad_rtol=1e-6
):
    """Loss within ``loss_rtol`` (relative; elementwise for "none", scaled by the max) and grad within
    ``grad_rtol`` × max|grad| of the fp64 torchvision oracle."""
    grad_out = None
    if reduction == "none":
        grad_out = torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits.dtype)
    params = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    loss, grad = run_op(logits, labels, backend=backend, grad_out=grad_out, **params)
    ref_loss, ref_grad = oracle(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction, grad_out=grad_out)
    assert loss.shape == ref_loss.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    loss_err = (loss.double() - ref_loss).abs().max()
    loss_tol = loss_rtol * max(ref_loss.abs().max().item(), 1e-30)
    assert loss_err <= loss_tol, f"loss error {loss_err:.3e} > {loss_tol:.3e}"
    grad_err = (grad.double() - ref_grad).abs().max()
    grad_tol = grad_rtol * max(ref_grad.abs().max().item(), 1e-30)
    assert grad_err <= grad_tol, f"grad error {grad_err:.3e} > {grad_tol:.3e}"
