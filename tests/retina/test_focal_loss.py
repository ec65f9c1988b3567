"""Fused sigmoid focal loss: parity with torchvision (fp64 oracle), numerics, determinism, dispatch, recompiles.

The eager backend runs the full parameter grid (it is the same formula the compiled backend compiles); the
compiled backend runs a cross-section, because each new dtype costs a few seconds of compilation on 2 cores.
The Triton kernel is tested in tests/retina/test_focal_loss_triton.py (interpreter subprocess and GPU).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch

from retina.ops import focal_loss_cpu, sigmoid_focal_loss
from retina.ops.focal_loss import resolve_backend, sigmoid_focal_loss_reference
from tests.retina._focal_helpers import (
    ALPHAS,
    GAMMAS,
    NUM_CLASSES,
    REDUCTIONS,
    assert_close_to_oracle,
    make_inputs,
    oracle,
    run_op,
)

# 203 rows: not a multiple of any block or chunk size
ROWS = 203


@pytest.mark.parametrize("num_classes", NUM_CLASSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_eager_matches_torchvision_on_the_full_grid(num_classes, reduction):
    logits, labels = make_inputs((ROWS,), num_classes, seed=num_classes)
    for gamma, alpha in itertools.product(GAMMAS, ALPHAS):
        assert_close_to_oracle(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction, backend="eager")


@pytest.mark.parametrize("num_classes", [1, 81])  # K=1 is its own graph (0/1 specialisation), 80 is tested below
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_matches_torchvision(num_classes, reduction):
    logits, labels = make_inputs((2, ROWS), num_classes, seed=num_classes)
    for gamma, alpha in [(2.0, 0.25), (0.5, -1.0), (0.0, 0.5)]:
        assert_close_to_oracle(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction, backend="compiled")


def test_chunked_rows_match_one_chunk(monkeypatch):
    # many chunks (the last one short) must give the same loss and grad as the oracle
    monkeypatch.setattr(focal_loss_cpu, "CHUNK_ELEMENTS", 7 * 80)
    monkeypatch.setattr(focal_loss_cpu, "EAGER_CHUNK_ELEMENTS", 5 * 80)
    logits, labels = make_inputs((3, 101), 80, seed=3)
    for backend in ("eager", "compiled"):
        assert_close_to_oracle(logits, labels, alpha=0.25, gamma=2.0, reduction="sum", backend=backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_its_precision(backend, dtype):
    # the oracle sees the same rounded logits, so the loss differs only by fp32 accumulation; the gradient and the
    # "none" loss are stored in the low-precision dtype: half an ulp relative to the largest value, plus slack.
    logits, labels = make_inputs((2, ROWS), 80, dtype=dtype, seed=7)
    ulp = torch.finfo(dtype).eps
    assert_close_to_oracle(
        logits, labels, alpha=0.25, gamma=2.0, reduction="sum", backend=backend, loss_rtol=1e-6, grad_rtol=ulp
    )
    loss = sigmoid_focal_loss(logits, labels, reduction="sum", backend=backend)
    assert loss.dtype == torch.float32  # sums are returned in fp32 (module docstring)
    elementwise = sigmoid_focal_loss(logits, labels, reduction="none", backend=backend)
    assert elementwise.dtype == dtype and elementwise.shape == logits.shape


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_non_contiguous_logits(backend):
    base, labels = make_inputs((2, 150), 162, seed=5)
    strided = base[..., ::2]  # [2, 150, 81] with column stride 2: read through strides
    assert not strided.is_contiguous()
    assert_close_to_oracle(strided, labels, alpha=0.25, gamma=2.0, reduction="sum", backend=backend)
    permuted = make_inputs((2, 81), 150, seed=6)[0].permute(0, 2, 1)  # [2, 150, 81] not viewable as rows
    assert_close_to_oracle(permuted, labels, alpha=0.25, gamma=2.0, reduction="none", backend=backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_all_ignored_and_no_foreground(backend):
    logits, labels = make_inputs((ROWS,), 80, seed=8)
    ignored = torch.full_like(labels, -2)
    loss, grad = run_op(logits, ignored, backend=backend)
    assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    background = torch.where(labels == -2, labels, torch.full_like(labels, -1))  # no foreground at all
    assert_close_to_oracle(logits, background, alpha=0.25, gamma=2.0, reduction="mean", backend=backend)


def test_ignored_rows_have_zero_loss_and_grad():
    logits, labels = make_inputs((ROWS,), 3, seed=9, ignored=0.3)
    x = logits.clone().requires_grad_()
    loss = sigmoid_focal_loss(x, labels, reduction="none", backend="eager")
    loss.sum().backward()
    ignored = labels == -2
    assert ignored.any() and (~ignored).any()
    assert torch.all(loss[ignored] == 0) and torch.all(x.grad[ignored] == 0)
    assert torch.all(loss[~ignored] > 0)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_extreme_logits_are_finite(backend, gamma):
    # every label kind against logits ±100: σ^γ underflows to 0 and softplus reaches 100
    logits = torch.tensor([[-100.0, 100.0, 0.0]] * 4)
    labels = torch.tensor([0, 1, -1, -2])
    loss, grad = run_op(logits, labels, gamma=gamma, reduction="none", backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref_loss, ref_grad = oracle(logits, labels, alpha=0.25, gamma=gamma, reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    # torchvision's own gradient is NaN where (1 - p_t)^γ saturates with γ < 1 (0 · ∞); compare where it is finite
    finite = torch.isfinite(ref_grad)
    assert finite.sum() >= 9
    torch.testing.assert_close(grad.double()[finite], ref_grad[finite], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "backend, reduction", [("eager", "sum"), ("eager", "mean"), ("eager", "none"), ("compiled", "sum")]
)
def test_gradcheck_fp64(backend, reduction):
    logits, labels = make_inputs((4, 5), 3, dtype=torch.float64, seed=10, fg=0.3, ignored=0.2)
    for gamma, alpha in [(2.0, 0.25), (0.5, -1.0), (0.0, 0.5)]:
        x = logits.clone().requires_grad_()
        fn = functools.partial(
            sigmoid_focal_loss, labels=labels, alpha=alpha, gamma=gamma, reduction=reduction, backend=backend
        )
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_bitwise_deterministic(backend):
    logits, labels = make_inputs((2, 4000), 80, seed=11)
    first_loss, first_grad = run_op(logits, labels, backend=backend)
    second_loss, second_grad = run_op(logits, labels, backend=backend)
    assert torch.equal(first_loss, second_loss) and torch.equal(first_grad, second_grad)


def test_new_gamma_and_alpha_compile_nothing():
    from torch._dynamo.utils import counters

    logits, labels = make_inputs((2, 97), 80, seed=12)
    run_op(logits, labels, alpha=0.25, gamma=2.0, backend="compiled")  # compiled (or cached) once here
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["ok"]
    results = set()
    for gamma, alpha in [(0.0, 0.25), (0.5, -1.0), (1.7, 0.9), (5.0, 0.5)]:
        loss, _ = run_op(logits, labels, alpha=alpha, gamma=gamma, backend="compiled")
        results.add(loss.item())
    assert counters["stats"]["unique_graphs"] == graphs and counters["frames"]["ok"] == frames
    assert len(results) == 4  # the values really reached the compiled code


def test_label_dtypes_agree():
    logits, labels = make_inputs((ROWS,), 81, seed=13)
    results = [sigmoid_focal_loss(logits, labels.to(dtype), backend="eager") for dtype in (torch.int8, torch.int16)]
    results += [sigmoid_focal_loss(logits, labels.to(torch.int32), backend="compiled")]
    expected = sigmoid_focal_loss(logits, labels, backend="eager")
    assert all(torch.equal(result, expected) for result in results[:2])
    torch.testing.assert_close(results[2], expected, rtol=1e-6, atol=0)


def test_retain_graph_second_backward_recomputes():
    logits, labels = make_inputs((ROWS,), 80, seed=14)
    x = logits.clone().requires_grad_()
    loss = sigmoid_focal_loss(x, labels, backend="eager")
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    (3 * loss).backward()
    torch.testing.assert_close(x.grad, 4 * once, rtol=1e-6, atol=0)


def test_second_backward_without_logits_raises():
    logits, labels = make_inputs((ROWS,), 80, seed=15)
    leaf = logits.clone().requires_grad_()
    activation = leaf * 1.0  # a non-leaf the caller drops, as a model's head output would be
    loss = sigmoid_focal_loss(activation, labels, backend="eager")
    del activation
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_environment_variable_selects_backend(monkeypatch):
    calls = []
    eager = focal_loss_cpu.loss_and_grad_eager
    monkeypatch.setattr(focal_loss_cpu, "loss_and_grad_eager", lambda *a, **k: calls.append(1) or eager(*a, **k))
    logits, labels = make_inputs((ROWS,), 3, seed=16)
    monkeypatch.setenv("RETINA_FOCAL_LOSS", "eager")
    sigmoid_focal_loss(logits, labels)
    assert calls == [1]
    monkeypatch.setenv("RETINA_FOCAL_LOSS", "reference")
    x = logits.clone().requires_grad_()
    loss = sigmoid_focal_loss(x, labels)
    assert loss.grad_fn.name() != "FusedFocalLossBackward"
    reference = sigmoid_focal_loss_reference(logits, labels, alpha=0.25, gamma=2.0, reduction="sum")  # the defaults
    assert torch.equal(loss, reference) and calls == [1]
    assert resolve_backend("auto", torch.device("cpu")) == "compiled"  # size unknown: compiled
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("fused", torch.device("cpu"))  # no synonyms: one name per backend
    # auto on CPU: small logits run eager (a compile costs more than it saves there), large ones compiled
    assert resolve_backend("auto", torch.device("cpu"), 26_400 * 5) == "eager"
    assert resolve_backend("auto", torch.device("cpu"), 480_000 * 80) == "compiled"
    assert resolve_backend("compiled", torch.device("cpu"), 10) == "compiled"  # asked for by name: compiled
    assert resolve_backend(None, torch.device("cpu")) == "reference"  # env var read per call
    monkeypatch.setenv("RETINA_FOCAL_LOSS", "bogus")
    with pytest.raises(ValueError, match="backend"):
        sigmoid_focal_loss(logits, labels)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sigmoid_focal_loss(logits, labels, backend="triton")


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(focal_loss_cpu, "_get_compiled_chunk", broken)
    monkeypatch.setattr(focal_loss_cpu, "_compile_failed", False)
    logits, labels = make_inputs((ROWS,), 80, seed=17)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        loss = sigmoid_focal_loss(logits, labels, backend="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = sigmoid_focal_loss(logits, labels, backend="compiled")
    expected = sigmoid_focal_loss(logits, labels, backend="eager")
    assert torch.equal(loss, expected) and torch.equal(again, expected)


def test_invalid_arguments():
    logits, labels = make_inputs((ROWS,), 3, seed=18)
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(logits, labels, reduction="avg")
    with pytest.raises(TypeError, match="integer"):
        sigmoid_focal_loss(logits, labels.float())
    with pytest.raises(ValueError, match="shape"):
        sigmoid_focal_loss(logits, labels[:-1])


def test_no_grad_forward_matches():
    logits, labels = make_inputs((ROWS,), 80, seed=19)
    with torch.no_grad():
        loss = sigmoid_focal_loss(logits, labels, backend="compiled")
    ref_loss, _ = oracle(logits, labels, alpha=0.25, gamma=2.0, reduction="sum")
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * ref_loss.item()
