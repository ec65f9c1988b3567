"""Triton kernel: focal loss and its gradient in one pass over the logits, deterministic two-stage sum.

Import this module only when the Triton path is used: ``triton.jit`` decides at definition time whether the
kernel runs compiled (CUDA) or in the interpreter (``TRITON_INTERPRET=1``, CPU tensors; how CI tests it).

Layout: a 1-D grid over blocks of ``BLOCK_R`` anchor rows; each program loops over the K columns in tiles of
``BLOCK_K`` (2-D tiling, so there is no per-element integer division), writes the unscaled gradient (and the
elementwise loss for ``reduction="none"``) and stores its fp32 partial loss sum in ``partials[pid]``. A second
single-program kernel adds the partials in a fixed order, so two runs give bitwise-equal losses (no atomics).
Logits are read through their row/column strides, so any 2-D view (e.g. ``x[:, ::2]``) needs no copy.

γ: a small integer γ (0..4; 2 is the paper's) is a ``constexpr`` and σ^γ is γ multiplies; any other γ uses one
exp2. So at most six specialisations exist per dtype and a new γ or α value compiles nothing. α is a runtime
float (``a_pos``, ``a_neg`` = α, 1-α, or 1, 1 when α < 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_INT_GAMMA = 4  # γ ∈ {0, 1, 2, 3, 4} gets the multiply fast path
LAUNCHES = {"loss_and_grad": 0}  # tests check that the kernel (not a fallback) ran


@triton.jit
def _focal_loss_fwd_kernel(
    x_ptr,  # [R, K] logits, strides (stride_r, stride_k)
    labels_ptr,  # [R] integer labels: class index, -1 background, -2 ignored
    grad_ptr,  # [R, K] contiguous, x's dtype: d(sum loss)/dx, unscaled
    loss_ptr,  # [R, K] contiguous, x's dtype: elementwise loss (only when WRITE_LOSS)
    partials_ptr,  # [num_programs] fp32 (fp64 for fp64 x): per-program loss sums
    num_rows,
    num_classes,
    stride_r,
    stride_k,
    a_pos,  # α weight of the positive column
    a_neg,  # α weight of the negative columns
    gamma,  # runtime γ, used only when GAMMA_INT < 0
    GAMMA_INT: tl.constexpr,  # >= 0: σ^γ as GAMMA_INT multiplies; -1: exp2 path
    WRITE_GRAD: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,  # fp64 inputs (gradcheck) compute in fp64, everything else in fp32
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    acc_dtype = tl.float64 if COMPUTE_F64 else tl.float32
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)  # offsets beyond 2^31 elements stay correct
    # out-of-range rows read as "ignored" so they add nothing; labels of any integer dtype are widened here
    labels = tl.load(labels_ptr + rows64, mask=row_ok, other=-2).to(tl.int32)
    keep_row = (labels != -2) & row_ok  # [BLOCK_R]
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=acc_dtype)
    for k0 in range(0, num_classes, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        in_bounds = row_ok[:, None] & (cols < num_classes)[None, :]  # [BLOCK_R, BLOCK_K]
        x_offsets = rows64[:, None] * stride_r + cols[None, :].to(tl.int64) * stride_k
        x = tl.load(x_ptr + x_offsets, mask=in_bounds, other=0.0).to(acc_dtype)
        is_pos = labels[:, None] == cols[None, :]  # the label's column; -1/-2 match none
        z = tl.where(is_pos, -x, x)  # loss = a·σ(z)^γ·softplus(z) in both cases
        e = tl.exp2(-tl.abs(x) * LOG2E)  # exp(-|x|) in (0, 1]: shared by σ and softplus, never overflows
        u = 1.0 + e
        r = 1.0 / u
        # log1p(e) without a log1p intrinsic: log(u) plus the first-order correction for the rounding of 1+e
        # (u - 1 is exact), accurate to ~1 ulp even when e << eps where log(u) alone would be 0.
        log1p_e = tl.log2(u) / LOG2E + (e - (u - 1.0)) * r
        z_nonneg = z >= 0
        sig_z = tl.where(z_nonneg, r, e * r)  # σ(z)
        sig_negz = tl.where(z_nonneg, e * r, r)  # σ(-z) = 1 - σ(z) without cancellation
        sp_z = tl.maximum(z, 0.0) + log1p_e  # softplus(z): the cross-entropy term
        if GAMMA_INT >= 0:
            modulator = tl.full((BLOCK_R, BLOCK_K), 1.0, acc_dtype)
            for _ in tl.static_range(GAMMA_INT):
                modulator = modulator * sig_z
        else:
            # σ(z)^γ = exp(-γ·softplus(-z)): finite for every γ >= 0 (no 0**0, no σ^(γ-1))
            sp_negz = tl.maximum(-z, 0.0) + log1p_e
            modulator = tl.exp2(-gamma * sp_negz * LOG2E)
        weight = tl.where(is_pos, a_pos, a_neg) * modulator
        keep = in_bounds & keep_row[:, None]
        weight = tl.where(keep, weight, 0.0)
        acc += weight * sp_z
        out_offsets = rows64[:, None] * num_classes + cols[None, :]
        if WRITE_GRAD:
            # dloss/dz = a·σ(z)^γ·(γ·σ(-z)·softplus(z) + σ(z)); dz/dx = -1 in the positive column
            grad = weight * (gamma * sig_negz * sp_z + sig_z)
            grad = tl.where(is_pos, -grad, grad)
            tl.store(grad_ptr + out_offsets, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)
        if WRITE_LOSS:
            tl.store(loss_ptr + out_offsets, (weight * sp_z).to(loss_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(partials_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, num_partials, BLOCK: tl.constexpr):
    """One program adds the partials in a fixed order: the deterministic second stage of the loss sum."""
    acc = tl.zeros((BLOCK,), dtype=out_ptr.dtype.element_ty)
    for start in range(0, num_partials, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offsets, mask=offsets < num_partials, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


def gamma_specialisation(gamma: float) -> int:
    """The ``GAMMA_INT`` constexpr for γ: the integer for γ ∈ {0..MAX_INT_GAMMA}, else -1 (generic exp2 path)."""
    return int(gamma) if float(gamma).is_integer() and 0 <= gamma <= MAX_INT_GAMMA else -1


def _block_sizes(num_classes: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K) for a K: untuned heuristics (no GPU was available when this was written).

    BLOCK_K is the power of two in 16..128 with the fewest padded (masked) columns, the larger one on a tie
    (K=80 -> 16, K=81 -> 32, K=1 -> 16): on the GPU a 16-wide fp32 row piece is two full 32-byte sectors, so small
    tiles cost no bandwidth while a 128-wide tile would compute 48 dead lanes per row for K=80.
    BLOCK_R makes a tile of 2048 elements (16 per thread at 4 warps).
    """
    widest = max(16, min(128, triton.next_power_of_2(max(1, num_classes))))
    candidates = [c for c in (16, 32, 64, 128) if c <= widest]
    block_k = min(candidates, key=lambda c: (triton.cdiv(num_classes, c) * c, -c))
    return 2048 // block_k, block_k


def loss_and_grad_triton(
    x: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    *,
    elementwise: bool = False,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backend entry point (same contract as ``focal_loss_cpu.loss_and_grad_eager``)."""
    num_rows, num_classes = x.shape
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad = torch.empty((num_rows, num_classes), dtype=x.dtype, device=x.device) if need_grad else None  # [R, K]
    loss = torch.empty((num_rows, num_classes), dtype=x.dtype, device=x.device) if elementwise else None  # [R, K]
    if x.numel() == 0:
        return (loss if elementwise else torch.zeros((), dtype=compute_dtype, device=x.device)), grad
    if labels.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        labels = labels.to(torch.int32)  # uint8/bool/... are not valid label dtypes for signed comparisons
    block_r, block_k = _block_sizes(num_classes)
    num_programs = triton.cdiv(num_rows, block_r)
    partials = torch.empty(num_programs, dtype=compute_dtype, device=x.device)  # [programs] per-program sums
    a_pos, a_neg = (float(alpha), 1.0 - float(alpha)) if alpha >= 0 else (1.0, 1.0)
    _focal_loss_fwd_kernel[(num_programs,)](
        x,
        labels,
        grad if grad is not None else partials,  # unused pointer when not written
        loss if loss is not None else partials,
        partials,
        num_rows,
        num_classes,
        x.stride(0),
        x.stride(1),
        a_pos,
        a_neg,
        float(gamma),
        GAMMA_INT=gamma_specialisation(gamma),
        WRITE_GRAD=need_grad,
        WRITE_LOSS=elementwise,
        COMPUTE_F64=compute_dtype == torch.float64,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=4,
    )
    LAUNCHES["loss_and_grad"] += 1
    if elementwise:
        return loss, grad
    total = torch.empty((), dtype=compute_dtype, device=x.device)  # the fp32 (fp64) loss sum
    _sum_partials_kernel[(1,)](partials, total, num_programs, BLOCK=1024, num_warps=4)
    return total, grad
