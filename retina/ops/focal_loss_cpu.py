"""Single-pass focal loss + gradient written in PyTorch: the CPU path (compiled, or eager as a fallback).

Every backend in this package returns the same thing from ``loss_and_grad(x, labels, alpha, gamma, ...)``:

- ``x``: float ``[R, K]`` logits (rows = anchors over all images), any strides;
- ``labels``: integer ``[R]``: class index (foreground), ``-1`` background, ``-2`` ignored;
- returns ``(loss, grad)``: ``loss`` is the fp32 0-dim sum (fp64 for fp64 input), or with ``elementwise=True``
  the ``[R, K]`` loss in ``x``'s dtype; ``grad`` is d(sum of loss)/dx as a contiguous ``[R, K]`` tensor in ``x``'s
  dtype, not yet scaled by the upstream gradient, or ``None`` when ``need_grad`` is False.

The formula (docs/focal-loss.md): with ``z = x`` for a negative column and ``z = -x``
for the positive one, ``loss = a · σ(z)^γ · softplus(z)`` and
``dloss/dx = ±a · σ(z)^γ · (γ · σ(-z) · softplus(z) + σ(z))``. It never forms ``σ^(γ-1)``, so γ < 1 (γ = 0.5, γ = 0)
is finite everywhere, and ``σ(z)^γ = exp(-γ · softplus(-z))`` never evaluates ``0 ** 0``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from retina.ops import cpu_buffers

IGNORE = -2

# Rows per chunk are chosen so one chunk holds about this many elements. Without chunking the peak extra memory
# would be 2x (compiled: Inductor still stores log1p(exp(-|x|)) between its two loops) to ~12x (eager
# temporaries) the logits. Compiled chunks are larger because every call opens an OpenMP region and passes
# dynamo's guards (~0.1 ms); 2^20 elements = 4 MiB fp32 per temporary, 2^17 x ~12 eager temporaries = 6 MiB.
CHUNK_ELEMENTS = 1 << 20
EAGER_CHUNK_ELEMENTS = 1 << 17


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 accumulate in fp32 (the loss is a sum of ~10^7 small terms); fp64 stays fp64 for gradcheck.
    return torch.float64 if dtype == torch.float64 else torch.float32


def focal_terms(
    x: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor, square: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element loss and gradient in the compute dtype, ``[R, K]`` each; ignored rows are 0.

    ``alpha`` and ``gamma`` are 0-dim tensors so that torch.compile treats them as data (changing them recompiles
    nothing); ``alpha < 0`` selects a = 1 with a ``where`` instead of a Python branch for the same reason.
    ``square=True`` (only when ``gamma`` is exactly 2, the paper's value) forms σ(z)^2 as a multiply instead of
    ``exp(-γ · softplus(-z))``: one transcendental less per element. It is the one value-dependent variant, so
    at most two graphs exist per dtype whatever γ a search tries.
    """
    xf = x.to(_compute_dtype(x.dtype))
    classes = torch.arange(x.shape[-1], device=x.device)  # [K]; compared with labels instead of a one-hot
    lab = labels[:, None]  # [R, 1]
    is_pos = lab == classes  # [R, K] True in the label's column (fused away when compiled)
    keep = lab != IGNORE  # [R, 1] False for ignored anchors
    z = torch.where(is_pos, -xf, xf)
    e = torch.exp(-xf.abs())  # shared by σ and softplus; in (0, 1] so nothing overflows for |x| up to ∞
    u = 1.0 + e  # in [1, 2]
    r = 1.0 / u
    # log1p(e) as log(u) plus the first-order correction for the rounding of 1 + e (as the Triton kernel does):
    # within an ulp, e itself where u rounds to 1, and it reuses r. ATen's vectorised log1p is ~7x slower than
    # log on AVX-512 and was 60 % of the whole kernel's time.
    log1p_e = torch.log(u) + (e - (u - 1.0)) * r
    sig_z = torch.where(z >= 0, r, e * r)  # σ(z)
    sig_negz = torch.where(z >= 0, e * r, r)  # σ(-z) = 1 - σ(z), without the cancellation
    sp_z = z.clamp_min(0) + log1p_e  # softplus(z): the BCE term
    if square:
        modulator = sig_z * sig_z  # σ(z)^2 = (1 - p_t)^2
    else:
        sp_negz = (-z).clamp_min(0) + log1p_e  # softplus(-z) = -log σ(z)
        modulator = torch.exp(-gamma * sp_negz)  # σ(z)^γ = (1 - p_t)^γ
    a = torch.where(alpha >= 0, torch.where(is_pos, alpha, 1.0 - alpha), torch.ones_like(alpha))
    w = torch.where(keep, a * modulator, 0.0)
    loss = w * sp_z
    grad = w * (gamma * sig_negz * sp_z + sig_z)
    grad = torch.where(is_pos, -grad, grad)  # dz/dx = -1 in the positive column
    return loss, grad


def _chunk(x, labels, alpha, gamma, grad_out, loss_out, square=False):
    """One row chunk: writes ``grad_out``/``loss_out`` (``[r, K]``, either may be None) and returns the fp64 sum.

    The sum is two-level: each row's K terms in the compute dtype (K ≤ a few hundred: rounding ~1e-7 relative),
    then the row sums in fp64. A flat fp32 vectorised sum over ~10^5 terms per lane drifts by ~1e-5 relative; a
    flat fp64 sum converts every element and cost 30 ms of 150 on 2 x 120,087 x 80. Writing into caller-owned
    slices (Inductor turns the ``copy_`` into a direct store) lets the chunk loop fill one preallocated gradient
    without a concatenation.
    """
    loss, grad = focal_terms(x, labels, alpha, gamma, square)
    if grad_out is not None:
        grad_out.copy_(grad)
    if loss_out is not None:
        loss_out.copy_(loss)
        return None
    return loss.sum(dim=1).double().sum()  # [r] row sums, then fp64


def _scalars(x: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = _compute_dtype(x.dtype)
    return torch.tensor(alpha, dtype=dtype, device=x.device), torch.tensor(gamma, dtype=dtype, device=x.device)


def _run_chunks(
    chunk_fn: Callable,
    x: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    elementwise: bool,
    need_grad: bool,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drives ``chunk_fn`` over row chunks of ``x``: temporaries stay chunk-sized, peak extra memory ≈ the gradient."""
    num_rows, num_classes = x.shape
    x = x.detach()  # inside the autograd.Function already; detached, x's requires_grad cannot cause a recompile
    a, g = _scalars(x, alpha, gamma)
    shape = (num_rows, num_classes)
    grad = cpu_buffers.empty(shape, x.dtype, x.device) if need_grad else None  # [R, K] d(sum loss)/dx
    loss = cpu_buffers.empty(shape, x.dtype, x.device) if elementwise else None  # [R, K] elementwise loss
    partials = []  # fp64 per-chunk sums, added in chunk order so the result is deterministic
    step = max(1, chunk_elements // max(1, num_classes))
    for start in range(0, num_rows, step):
        rows = slice(start, start + step)
        partial = chunk_fn(
            x[rows],
            labels[rows],
            a,
            g,
            grad[rows] if grad is not None else None,
            loss[rows] if loss is not None else None,
            gamma == 2.0,  # a Python bool: the γ = 2 graph multiplies instead of calling exp
        )
        partials.append(partial)
    if not elementwise:
        dtype = _compute_dtype(x.dtype)
        loss = torch.stack(partials).sum().to(dtype) if partials else x.new_zeros((), dtype=dtype)
    return loss, grad


def loss_and_grad_eager(
    x: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    *,
    elementwise: bool = False,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The formula in eager PyTorch over row chunks (~12 chunk-sized temporaries); works on any device."""
    return _run_chunks(_chunk, x, labels, alpha, gamma, elementwise, need_grad, EAGER_CHUNK_ELEMENTS)


_compiled_chunk: Callable | None = None
_compile_failed = False


def _get_compiled_chunk() -> Callable:
    global _compiled_chunk
    if _compiled_chunk is None:
        # dynamic=True: chunk length, K and strides vary (last chunk, other heads) without recompiling; the
        # None-ness of grad_out/loss_out gives at most four graphs per dtype.
        _compiled_chunk = torch.compile(_chunk, dynamic=True, fullgraph=True)
    return _compiled_chunk


def compile_available() -> bool:
    """False once a compile failed in this process, or when ``RETINA_FOCAL_LOSS_NO_COMPILE=1``."""
    return not _compile_failed and os.environ.get("RETINA_FOCAL_LOSS_NO_COMPILE", "0") != "1"


def loss_and_grad_compiled(
    x: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    gamma: float,
    *,
    elementwise: bool = False,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The formula compiled by Inductor into one loop nest: reads x once, writes grad once, no temporaries.

    If compiling fails (no C++ compiler, unsupported platform) it warns once and uses the eager path for the rest
    of the process.
    """
    global _compile_failed
    if compile_available():
        # int64 labels for every caller: one graph per dtype of x instead of one per (x dtype, label dtype)
        lab = labels.to(torch.int64)
        try:
            # graphs per (dtype, reduction kind, K == 1, stride pattern) can exceed dynamo's default of 8
            with torch._dynamo.config.patch(recompile_limit=64):
                return _run_chunks(_get_compiled_chunk(), x, lab, alpha, gamma, elementwise, need_grad, CHUNK_ELEMENTS)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use eager", never a wrong answer
            _compile_failed = True
            warnings.warn(
                f"retina focal loss: torch.compile failed ({type(exc).__name__}: {exc}); using the eager fused path",
                RuntimeWarning,
                stacklevel=2,
            )
    return loss_and_grad_eager(x, labels, alpha, gamma, elementwise=elementwise, need_grad=need_grad)
