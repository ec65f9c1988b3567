"""Stage 2: the focal-loss benchmark at 16 × 120,087 × 80 bf16 (benchmarks/focal_loss.py's inputs and variants).

Times (a) torchvision's RetinaNet usage, (c) torch.compile of the class-index formula and (d) ours, forward +
backward, as the benchmark does (median of synchronised steps). Then the bandwidth: ours and a device-to-device
copy of the logits, each timed back to back with CUDA events; ours moves the logits in, the gradient out and the
labels in, the copy the logits in and out, so (ours' bytes / ours' time) / (copy bytes / copy time) is the
fraction of the copy's bandwidth that the loss reaches. (d) must agree with (c) (loss and gradient) first.
"""

from __future__ import annotations

import focal_loss as bench  # benchmarks/focal_loss.py
import torch

from gpu_stages.common import Context, log, mean_ms, require

STAGE = "2 focal-loss"


def _bench_args(ctx: Context):
    if ctx.dry_run:
        sizes = ["--batch", "2", "--anchors", "1000", "--repeats", "5", "--budget-s", "0.2", "--warmup", "1"]
    else:
        sizes = ["--batch", "16", "--anchors", "120087", "--repeats", "30", "--budget-s", "3", "--warmup", "3"]
    return bench.parse_args(["--device", ctx.device.type, "--dtype", "bf16", "--classes", "80", *sizes])


def _variants(ctx: Context) -> dict[str, object]:
    # Inductor on CPU needs minutes of C++ compiling on a 2-core machine; the dry run traces with Dynamo only.
    backend = "eager" if ctx.dry_run else "inductor"
    return {
        "a": bench.torchvision_retinanet,
        "c": torch.compile(bench.class_index_formula, backend=backend),
        "d": bench.ours,
    }


def _loss_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    loss = bench.step(fn, logits, labels)
    return loss.float(), logits.grad.detach().clone()


def check_agreement(fns: dict[str, object], logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(d) against (c) on the benchmark's own inputs: loss within 1e-4 relative (fp32 sums of ~10^8 terms in two
    orders), gradient elementwise within 2 bf16 ulps + 1e-5 × max (ours rounds twice: the kernel's unscaled
    gradient, then its scaling by 1/N in the backward). Returns the (loss, gradient) errors; raises CheckFailed
    beyond them."""
    loss_c, grad_c = _loss_and_grad(fns["c"], logits, labels)
    loss_d, grad_d = _loss_and_grad(fns["d"], logits, labels)
    logits.grad = None
    require(bool(torch.isfinite(loss_d)) and bool(torch.isfinite(grad_d).all()), "ours: non-finite loss or gradient")
    loss_err = float((loss_d - loss_c).abs() / loss_c.abs().clamp(min=1e-30))
    require(loss_err <= 1e-4, f"ours' loss {float(loss_d):.8g} vs torch.compile's {float(loss_c):.8g}: {loss_err:.2e}")
    eps = torch.finfo(logits.dtype).eps
    diff = (grad_d.float() - grad_c.float()).abs()
    scale = grad_c.float().abs().max().clamp(min=1e-30)
    bad = diff > 2 * eps * grad_c.float().abs() + 1e-5 * scale
    require(not bool(bad.any()), f"ours' gradient differs from torch.compile's at {int(bad.sum())} elements")
    return loss_err, float(diff.max() / scale)


def _bandwidth(ctx: Context, logits: torch.Tensor, labels: torch.Tensor, iters: int) -> dict[str, float]:
    src = logits.detach()
    dst = torch.empty_like(src)
    copy_ms = mean_ms(lambda: dst.copy_(src), ctx.device, iters=iters)
    op_ms = mean_ms(lambda: bench.step(bench.ours, logits, labels), ctx.device, iters=iters)
    logits_bytes = src.numel() * src.element_size()
    moved = 2 * logits_bytes + labels.numel() * labels.element_size()  # logits in, gradient out, labels in
    out = {"copy_ms": copy_ms, "op_ms": op_ms, "copy_gbs": 2 * logits_bytes / copy_ms / 1e6}
    out["op_gbs"] = moved / op_ms / 1e6
    if ctx.cuda:
        # the kernel alone (no autograd, no normaliser, no launches around it): what the op could reach
        from retina.ops.focal_loss_triton import loss_and_grad_triton

        rows, lab = src.reshape(-1, src.shape[-1]), labels.reshape(-1)
        kernel_ms = mean_ms(lambda: loss_and_grad_triton(rows, lab, 0.25, 2.0), ctx.device, iters=iters)
        out["kernel_gbs"] = moved / kernel_ms / 1e6
    return out


def run(ctx: Context) -> None:
    args = _bench_args(ctx)
    logits, labels = bench.make_inputs(args)
    logits.requires_grad_()
    fns = _variants(ctx)
    log(f"{STAGE}: {tuple(logits.shape)} {logits.dtype} on {ctx.device}; checking (d) against (c)")
    loss_err, grad_err = check_agreement(fns, logits, labels)
    r = ctx.report
    r.correct(STAGE, "ours vs torch.compile: loss rel. error", loss_err, target="<= 1e-4")
    r.correct(STAGE, "ours vs torch.compile: grad max error / max|grad|", grad_err, target="<= 2 bf16 ulps")
    ms = {}
    for name, fn in fns.items():
        ms[name], _ = bench.time_variant(fn, logits, labels, args)
        log(f"{STAGE}: {bench.VARIANTS[name]}: {ms[name]:.3f} ms")
    shape = f"{args.batch}x{args.anchors:,}x{args.classes} bf16"
    r.info(STAGE, f"(a) torchvision's way, fwd+bwd, {shape}", ms["a"], "ms")
    r.info(STAGE, "(c) torch.compile, fwd+bwd", ms["c"], "ms")
    r.info(STAGE, "(d) ours, fwd+bwd", ms["d"], "ms")
    r.judge(STAGE, "speed-up vs torchvision's way", ms["a"] / ms["d"], "x", ">= 25x", ms["a"] / ms["d"] >= 25)
    r.judge(STAGE, "speed-up vs torch.compile", ms["c"] / ms["d"], "x", ">= 1.3x", ms["c"] / ms["d"] >= 1.3)
    bw = _bandwidth(ctx, logits, labels, iters=5 if ctx.dry_run else 50)
    fraction = bw["op_gbs"] / bw["copy_gbs"]
    r.info(STAGE, "device-to-device copy of the logits", bw["copy_gbs"], "GB/s")
    r.info(STAGE, "ours, fwd+bwd back to back", bw["op_ms"], "ms")
    # the op's bytes are counted as a single pass would move them; the op itself also reads the labels for the
    # normaliser and rescales the gradient in place in the backward (another read and write of it)
    r.judge(STAGE, "ours fwd+bwd: bandwidth / copy bandwidth", fraction * 100, "%", ">= 60%", fraction >= 0.60)
    if "kernel_gbs" in bw:
        r.info(STAGE, "kernel alone: bandwidth / copy bandwidth", bw["kernel_gbs"] / bw["copy_gbs"] * 100, "%")
    ctx.report.values["focal_ms"] = ms
    del logits, labels, fns
    if ctx.cuda:
        torch.cuda.empty_cache()
