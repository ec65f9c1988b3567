"""The Triton focal-loss kernel: interpreter run on CPU (always) and the compiled kernel on CUDA (``gpu`` mark)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retina.ops import sigmoid_focal_loss
from tests.retina._focal_helpers import make_inputs, oracle, run_op

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_kernel_under_triton_interpreter():
    # TRITON_INTERPRET is read when triton.jit defines the kernel, so the cases run in a fresh interpreter.
    env = {**os.environ, "TRITON_INTERPRET": "1", "RETINA_FOCAL_LOSS": "triton"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "_focal_triton_cases.py")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_gamma_specialisations_are_few():
    from retina.ops.focal_loss_triton import MAX_INT_GAMMA, gamma_specialisation

    assert [gamma_specialisation(g) for g in (0.0, 1.0, 2.0, 4.0)] == [0, 1, 2, 4]
    generic = {gamma_specialisation(g) for g in (0.5, 1.5, 2.0001, 5.0, 7.0, 0.25, MAX_INT_GAMMA + 1.0)}
    assert generic == {-1}


def test_block_sizes_cover_any_k():
    from retina.ops.focal_loss_triton import _block_sizes

    for num_classes in (1, 3, 80, 81, 264, 1000):
        block_r, block_k = _block_sizes(num_classes)
        assert block_k in (16, 32, 64, 128) and block_r * block_k == 2048
    assert _block_sizes(80)[1] == 16  # 80 = 5 × 16: no masked lanes


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_inputs(*args, **kwargs):
    logits, labels = make_inputs(*args, **kwargs)
    return logits.cuda(), labels.cuda()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("num_classes", [1, 80, 81])
def test_cuda_parity(reduction, num_classes):
    logits, labels = make_inputs((2, 3001), num_classes, seed=num_classes)
    for gamma, alpha in [(2.0, 0.25), (0.5, -1.0), (0.0, 0.5), (5.0, 0.25)]:
        loss, grad = run_op(logits.cuda(), labels.cuda(), alpha=alpha, gamma=gamma, reduction=reduction)
        ref_loss, ref_grad = oracle(logits, labels, alpha=alpha, gamma=gamma, reduction=reduction)
        # the GPU's exp2/log2 are approximate (~2 ulp), hence 4e-6 rather than the interpreter's 1e-6
        assert (loss.cpu().double() - ref_loss).abs().max() <= 4e-6 * ref_loss.abs().max()
        assert (grad.cpu().double() - ref_grad).abs().max() <= 4e-6 * ref_grad.abs().max()


@pytest.mark.gpu
@gpu
def test_cuda_bf16_deterministic_and_graph_capturable():
    logits, labels = _cuda_inputs((4, 120087), 80, dtype=torch.bfloat16, seed=3, fg=0.002, ignored=0.01, scale=1.5)
    first = run_op(logits, labels, backend="triton")
    second = run_op(logits, labels, backend="triton")
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    static = logits.clone().requires_grad_()
    sigmoid_focal_loss(static, labels).backward()  # warm up (compiles) outside the capture
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):  # fails on any host synchronisation
        loss = sigmoid_focal_loss(static, labels)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, first[0])


@pytest.mark.gpu
@gpu
def test_cuda_new_gamma_and_alpha_compile_nothing():
    from retina.ops import focal_loss_triton

    logits, labels = _cuda_inputs((2, 1000), 80, seed=4)
    kernel = focal_loss_triton._focal_loss_fwd_kernel
    run_op(logits, labels, gamma=0.5, alpha=0.25, backend="triton")  # the generic-γ specialisation
    cache = kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(cache)
    for gamma, alpha in [(0.7, 0.25), (1.5, -1.0), (3.3, 0.9), (5.0, 0.5)]:
        run_op(logits, labels, gamma=gamma, alpha=alpha, backend="triton")
    assert len(cache) == compiled
