"""Peak memory of the SigLIP sigmoid loss, unchunked vs chunked, forward + backward.

The sigmoid loss ("Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343) over a batch of
B pairs touches B x B logits: 4 GiB in fp32 at B = 32,768, more with the intermediates autograd
keeps. `polyclip.losses.SigLipLoss(chunk_size=C)` computes it in (B, C) tiles in both passes. This
script measures both forms on the same inputs and prints the two peaks, their ratio (target: the
chunked peak at most 1/8 of the unchunked one) and the two loss values (which must agree).

How memory is measured (CPU). Each form runs in a fresh subprocess, so neither sees the other's
freed memory or allocator caches. The subprocess builds the inputs (features, log-scale, bias), runs
a small warm-up forward + backward (thread pools, BLAS buffers), then resets the kernel's peak-RSS
counter by writing "5" to /proc/self/clear_refs, which sets the high-water mark to the current
resident size. After one forward + backward at full size it reads the high-water mark back
(VmHWM in /proc/self/status, the same counter as resource.getrusage's ru_maxrss) and reports
peak - resident-before: the extra memory the loss needed, feature gradients included. Large
tensors are allocated with mmap by the C allocator and returned to the system when freed, so
resident memory follows live tensors. Where clear_refs cannot be written the script falls back to
ru_maxrss after the inputs minus ru_maxrss before the loss (an upper bound on the baseline, so a
slight under-estimate of the loss's peak). On CUDA, torch.cuda.max_memory_allocated is used instead.

Usage:
    python benchmarks/sigmoid_loss_memory.py                 # B = 32768, D = 768, C = 2048
    python benchmarks/sigmoid_loss_memory.py --batch 4096    # smaller machines
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

TARGET_RATIO = 1 / 8
GIB = 1024**3


def _status_bytes(field: str) -> int:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM"), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {field} line")


def _peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_one_form(batch: int, dim: int, chunk_size: int | None, device: str, seed: int) -> dict:
    """Forward + backward of one form in this process; returns loss, peak bytes and seconds."""
    import torch

    from polyclip.losses import SigLipLoss

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def features() -> torch.Tensor:  # (B, D), unit rows, normalised in place (no second copy)
        values = torch.randn(batch, dim, generator=generator)
        values /= values.norm(dim=-1, keepdim=True)
        return values.to(device).requires_grad_()

    images, texts = features(), features()
    log_scale = torch.tensor(math.log(10.0), device=device, requires_grad=True)  # SigLIP init
    bias = torch.tensor(-10.0, device=device, requires_grad=True)  # SigLIP init
    loss_fn = SigLipLoss(chunk_size=chunk_size)

    warm_rows = min(batch, 256)
    warm_up = loss_fn(images[:warm_rows], texts[:warm_rows], log_scale.exp(), bias)
    warm_up.backward()
    for tensor in (images, texts, log_scale, bias):
        tensor.grad = None

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    elif _reset_peak():
        baseline = _status_bytes("VmRSS")
        method = "VmHWM after a clear_refs reset, minus VmRSS before"
    else:
        baseline = _peak_resident_bytes()
        method = "ru_maxrss after minus ru_maxrss before"

    started = time.perf_counter()
    loss = loss_fn(images, texts, log_scale.exp(), bias)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif method.startswith("VmHWM"):
        peak = _status_bytes("VmHWM")
    else:
        peak = _peak_resident_bytes()
    seconds = time.perf_counter() - started
    return {
        "chunk_size": chunk_size,
        "loss": loss.item(),
        "peak_bytes": peak - baseline,
        "seconds": seconds,
        "method": method,
        "grad_norms": {
            "images": images.grad.norm().item(),
            "texts": texts.grad.norm().item(),
            "log_scale": log_scale.grad.item(),
            "bias": bias.grad.item(),
        },
    }


def _run_in_subprocess(args: argparse.Namespace, chunk_size: int | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--single-form",
        "--batch",
        str(args.batch),
        "--dim",
        str(args.dim),
        "--chunk",
        str(chunk_size or 0),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(
            f"the {'chunked' if chunk_size else 'unchunked'} run failed "
            f"(exit {completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32768, help="global batch B (default 32768)")
    parser.add_argument("--dim", type=int, default=768, help="feature dimension D (default 768)")
    parser.add_argument("--chunk", type=int, default=2048, help="text rows per tile (default 2048)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-form", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 1 or args.dim < 1 or args.chunk < 0:
        parser.error("--batch and --dim must be positive, --chunk non-negative")

    if args.single_form:
        result = run_one_form(args.batch, args.dim, args.chunk or None, args.device, args.seed)
        print(json.dumps(result))
        return 0

    logits_gib = args.batch**2 * 4 / GIB
    print(f"sigmoid loss, B={args.batch}, D={args.dim}, fp32, device={args.device}")
    print(f"one B x B fp32 logits matrix: {logits_gib:.2f} GiB")
    unchunked = _run_in_subprocess(args, None)
    chunked = _run_in_subprocess(args, args.chunk)
    print(f"method: {unchunked['method']}")
    for name, result in (("unchunked", unchunked), (f"chunked C={args.chunk}", chunked)):
        print(
            f"{name:>18}: peak {result['peak_bytes'] / GIB:7.3f} GiB   "
            f"loss {result['loss']:.8f}   {result['seconds']:.1f} s"
        )
    ratio = chunked["peak_bytes"] / unchunked["peak_bytes"]
    loss_gap = abs(chunked["loss"] - unchunked["loss"])
    relative_gap = loss_gap / abs(unchunked["loss"])
    losses_match = relative_gap < 1e-5
    print(f"peak ratio chunked / unchunked: {ratio:.4f} (1/{1 / ratio:.1f}); target <= 1/8")
    print(f"loss difference: {loss_gap:.3e} (relative {relative_gap:.2e})")
    for name in unchunked["grad_norms"]:
        print(
            f"  grad {name:>9}: unchunked {unchunked['grad_norms'][name]:.6e}   "
            f"chunked {chunked['grad_norms'][name]:.6e}"
        )
    ok = ratio <= TARGET_RATIO and losses_match
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
