"""The autograd wrapper shared by the fused backends: gradient written in the forward, scaled in the backward.

The forward pass calls a backend ``loss_and_grad`` (Triton kernel, compiled or eager PyTorch formula) that reads
the logits once and writes the loss and the *unscaled* gradient d(sum of loss)/dx. Nothing else is saved: no
logits, no one-hot, no intermediates. The backward multiplies that gradient by ``grad_output`` (and 1/N for
"mean") in place and hands the same buffer to autograd, so the whole op allocates one gradient-sized tensor
(apex's design, see the survey notes §2.5).

Because the buffer is handed over, a second backward through the same graph (``retain_graph=True``, or
``gradcheck``'s reentrancy check) cannot reuse it; it recomputes the gradient from the logits instead, which the
wrapper reaches through a weak reference (holding them strongly would keep an activation-sized tensor alive until
the backward). If the logits are gone or were modified in place, that second backward raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

# (x [R, K], labels [R], alpha, gamma, *, elementwise, need_grad) -> (loss, grad [R, K] | None)
LossAndGrad = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _rows(logits: torch.Tensor) -> torch.Tensor:
    # [..., K] -> [R, K]: a view whenever the leading dims collapse to one stride (contiguous, row slices, column
    # slices like x[..., ::2]); backends read through strides. Other layouts (e.g. a permuted [B, A, K] view of
    # [B, K, A]) are copied once here, which is the only case that costs an extra logits-sized buffer.
    return logits.reshape(-1, logits.shape[-1])


class FusedFocalLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        alpha: float,
        gamma: float,
        reduction: str,
        loss_and_grad: LossAndGrad,
    ) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        elementwise = reduction == "none"
        loss, grad = loss_and_grad(
            _rows(logits), labels.reshape(-1), alpha, gamma, elementwise=elementwise, need_grad=need_grad
        )
        if elementwise:
            loss = loss.view(logits.shape)  # [..., K] in the logits' dtype, ignored rows 0
        elif reduction == "mean":
            loss = loss / logits.numel()  # over all elements, ignored rows included (torchvision); 0/0 -> nan
        ctx.reduction = reduction
        ctx.numel = logits.numel()
        ctx.grad = grad.view(logits.shape) if grad is not None else None  # [..., K] unscaled d(sum loss)/dx
        # enough to recompute the gradient on a second backward: labels are small ([...] integers)
        ctx.logits_ref = weakref.ref(logits)
        ctx.logits_version = logits._version
        ctx.recompute_args = (labels, alpha, gamma, loss_and_grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        none = (None,) * 5
        if ctx.reduction == "none":
            # elementwise upstream gradient: out of place, so the saved gradient stays valid for another backward
            return ctx.grad * grad_output, *none
        scale = grad_output if ctx.reduction == "sum" else grad_output / ctx.numel
        grad = ctx.grad
        ctx.grad = None  # drop our reference so autograd can take the buffer over without copying it
        if grad is None:
            grad = _recompute_grad(ctx)
        return grad.mul_(scale), *none


def _recompute_grad(ctx) -> torch.Tensor:
    logits = ctx.logits_ref()
    if logits is None or logits._version != ctx.logits_version:
        raise RuntimeError(
            "sigmoid_focal_loss: a second backward through the fused focal loss needs the logits, which were freed "
            "or modified in place; use RETINA_FOCAL_LOSS=reference for double backward passes"
        )
    labels, alpha, gamma, loss_and_grad = ctx.recompute_args
    _, grad = loss_and_grad(_rows(logits.detach()), labels.reshape(-1), alpha, gamma, need_grad=True)
    return grad.view(logits.shape)
