"""Training benchmarks: step speed against transformers, exact accumulation memory, sigmoid-loss memory.

Sections (``--section`` picks one; all run by default):

1. ``step``: one optimisation step of ViT-B/32 at batch 64, fp32 and bf16 autocast. polyclip's step
   (`polyclip.train.step.forward_backward`: encode, CLIP's softmax loss, backward) plus AdamW against
   transformers' ``CLIPModel(..., return_loss=True)`` plus the same AdamW (fused or foreach, the same
   decay groups and hyper-parameters), on the same weights (polyclip's random model exported with
   ``export_hf`` and read back by transformers) and the same inputs. The sides alternate step by step
   (and which goes first alternates too), so both see the same machine conditions; the median of the
   timed steps is reported with both sides of the ratio (target: transformers / polyclip >= 1.0). The
   two losses of the first step are printed as well: equal weights give equal losses.
2. ``accumulation``: the same contrastive batch in one step and as micro-batches of a quarter of it
   (exact GradCache accumulation, `polyclip.train.step`). Each form runs in its own subprocess; peak
   memory is measured over the forward + backward only, with the weights and their gradient buffers
   already allocated (CPU: the kernel's peak-RSS counter reset through /proc/self/clear_refs; CUDA:
   torch.cuda.max_memory_allocated). Target: accumulated peak <= 0.4 x one-step peak, same gradients.
3. ``sigmoid``: ``benchmarks/sigmoid_loss_memory.py`` (chunked vs unchunked sigmoid loss at global batch
   32,768 and d = 768; target: chunked peak <= 1/8 of unchunked, same value), run as it is.

Usage:
    python benchmarks/train.py
    python benchmarks/train.py --section step --steps 3 --threads 2
    python benchmarks/train.py --section accumulation --batch 64 --micro 16
    python benchmarks/train.py --section sigmoid --sigmoid-batch 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3
ACCUMULATION_TARGET = 0.4


# ---------------------------------------------------------------------------------------------------------
# 1. step speed against transformers


def _captions(count: int, seed: int) -> list[str]:
    import random

    words = (
        "a photo of the small large red green blue dog cat car house tree on in at near with under".split()
    )
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))) for _ in range(count)]


def _decay_groups(model, weight_decay: float) -> list[dict]:
    """polyclip's rule for any model: no decay on 1-D parameters (norms, biases, scale), embeddings."""
    import torch

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, plain = [], []
    for name, parameter in model.named_parameters():
        is_embedding = id(parameter) in embeddings or "position" in name or "class_embedding" in name
        (plain if parameter.ndim < 2 or is_embedding else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def step_speed(args) -> dict:
    import torch
    import transformers

    import polyclip
    from polyclip.checkpoints.export import export_hf
    from polyclip.losses import ClipLoss
    from polyclip.tokenizers import ClipTokenizer
    from polyclip.train.step import ContrastiveForward, StepInputs, forward_backward

    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = polyclip.create_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours, folder)
        theirs = transformers.CLIPModel.from_pretrained(folder, attn_implementation="sdpa")
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    fused = args.optimizer == "fused"
    options = {"fused": True} if fused else {"foreach": True}
    hyper = {"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-6, **options}
    optimizers = {
        "polyclip": torch.optim.AdamW(_decay_groups(ours, 0.1), **hyper),
        "transformers": torch.optim.AdamW(_decay_groups(theirs, 0.1), **hyper),
    }
    generator = torch.Generator().manual_seed(1)
    size = ours.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=generator).to(device)
    tokens = ClipTokenizer()(_captions(args.batch, 2)).to(device)  # (B, 77), zero padded after the end token
    mask = (tokens != 0).long()
    mask[:, 0] = 1

    for precision in args.precisions:
        autocast = (
            (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
            if precision == "bf16"
            else (lambda: _null())
        )
        inputs = StepInputs(ContrastiveForward(ours), ClipLoss(), False, autocast, _null)

        def step_ours():
            optimizers["polyclip"].zero_grad(set_to_none=True)
            loss = forward_backward(inputs, pixels, tokens)
            optimizers["polyclip"].step()
            return float(loss)

        def step_theirs():
            optimizers["transformers"].zero_grad(set_to_none=True)
            with autocast():
                out = theirs(input_ids=tokens, pixel_values=pixels, attention_mask=mask, return_loss=True)
            out.loss.backward()
            optimizers["transformers"].step()
            return float(out.loss.detach())

        steps = {"polyclip": step_ours, "transformers": step_theirs}
        times = {name: [] for name in steps}
        first_losses = {}
        for round_index in range(args.warmup + args.steps):
            order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
            for name in order:
                _sync(device)
                started = time.perf_counter()
                loss = steps[name]()
                _sync(device)
                if round_index == 0:
                    first_losses[name] = loss
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        ours_ms = statistics.median(times["polyclip"]) * 1000
        theirs_ms = statistics.median(times["transformers"]) * 1000
        result = {
            "polyclip_ms": ours_ms,
            "transformers_ms": theirs_ms,
            "speedup": theirs_ms / ours_ms,
            "first_losses": first_losses,
            "timed_steps": args.steps,
        }
        print(
            f"[step] {args.model} batch {args.batch} {precision} on {device} ({args.optimizer} AdamW, "
            f"{torch.get_num_threads()} threads): polyclip {ours_ms:.0f} ms, transformers {theirs_ms:.0f} ms "
            f"-> {result['speedup']:.2f}x (target >= 1.0); first-step losses "
            f"{first_losses['polyclip']:.5f} vs {first_losses['transformers']:.5f}",
            flush=True,
        )
        yield precision, result


def _null():
    import contextlib

    return contextlib.nullcontext()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# 2. exact accumulation memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} line")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def accumulation_form(
    model_name: str, batch: int, micro: int | None, device_name: str, grads_path: str
) -> dict:
    """Forward + backward of one contrastive batch in this process; peak memory over it; grads saved."""
    import torch

    import polyclip
    from polyclip.losses import ClipLoss
    from polyclip.train.step import ContrastiveForward, StepInputs, forward_backward

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = polyclip.create_model(model_name).to(device).train()
    inputs = StepInputs(ContrastiveForward(model), ClipLoss(), False, _null, _null)
    generator = torch.Generator().manual_seed(3)
    size = model.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device)
    tokens = torch.randint(1, 49000, (batch, 24), generator=generator)
    tokens[:, -1] = 49407
    tokens = tokens.to(device)
    forward_backward(inputs, pixels[:4], tokens[:4])  # warm-up: thread pools, and every .grad allocated
    for parameter in model.parameters():
        parameter.grad.zero_()  # kept allocated: the baseline holds weights and gradients
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline, method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
    elif _reset_peak():
        baseline, method = _status_bytes("VmRSS"), "VmHWM after a clear_refs reset, minus VmRSS before"
    else:
        raise SystemExit("peak memory on CPU needs a writable /proc/self/clear_refs (Linux)")
    started = time.perf_counter()
    loss = forward_backward(inputs, pixels, tokens, micro)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM")
    seconds = time.perf_counter() - started
    torch.save({n: p.grad.detach().cpu() for n, p in model.named_parameters()}, grads_path)
    return {
        "micro": micro,
        "loss": float(loss),
        "peak_bytes": peak - baseline,
        "seconds": seconds,
        "method": method,
    }


def accumulation(args) -> dict:
    import torch

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, micro in (("one step", None), (f"micro-batches of {args.micro}", args.micro)):
            grads = str(Path(folder) / f"{micro or 0}.pt")
            command = [
                sys.executable, __file__, "--accumulation-form", "--model", args.model, "--batch", str(args.batch),
                "--micro", str(micro or 0), "--device", args.device, "--grads", grads,
            ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise SystemExit(f"the {label} run failed:\n{completed.stderr[-4000:]}")
            results[label] = json.loads(completed.stdout.strip().splitlines()[-1])
            results[label]["grads"] = torch.load(grads)
    one, accumulated = results["one step"], results[f"micro-batches of {args.micro}"]
    worst = max(
        float((accumulated["grads"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        for n, g in one["grads"].items()
    )
    ratio = accumulated["peak_bytes"] / one["peak_bytes"]
    for label, result in results.items():
        print(
            f"[accumulation] {label:>22}: peak {result['peak_bytes'] / GIB:.3f} GiB, loss {result['loss']:.6f}, "
            f"{result['seconds']:.1f} s"
        )
    print(
        f"[accumulation] {args.model} contrastive batch {args.batch}: peak ratio {ratio:.3f} "
        f"(target <= {ACCUMULATION_TARGET}); largest gradient difference {worst:.2e} of the tensor's largest "
        f"value; method: {one['method']}",
        flush=True,
    )
    return {
        "one_step_peak_gib": one["peak_bytes"] / GIB,
        "accumulated_peak_gib": accumulated["peak_bytes"] / GIB,
        "peak_ratio": ratio,
        "losses": [one["loss"], accumulated["loss"]],
        "max_relative_grad_difference": worst,
        "target_met": ratio <= ACCUMULATION_TARGET and worst < 1e-4,
    }


# ---------------------------------------------------------------------------------------------------------
# 3. sigmoid loss memory (the losses' own benchmark)


def sigmoid(args) -> dict:
    command = [
        sys.executable, str(HERE / "sigmoid_loss_memory.py"), "--batch", str(args.sigmoid_batch),
        "--dim", str(args.sigmoid_dim), "--chunk", str(args.sigmoid_chunk), "--device", args.device,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    print("\n".join(f"[sigmoid] {line}" for line in completed.stdout.strip().splitlines()), flush=True)
    if completed.returncode not in (0, 1):
        print(completed.stderr[-4000:], file=sys.stderr)
    return {
        "exit_code": completed.returncode,
        "target_met": completed.returncode == 0,
        "output": completed.stdout,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=("all", "step", "accumulation", "sigmoid"), default="all")
    parser.add_argument("--model", default="ViT-B-32", help="architecture (default ViT-B-32)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side and precision")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--optimizer", choices=("fused", "foreach"), default="fused")
    parser.add_argument("--micro", type=int, default=16, help="micro-batch of the accumulation section")
    parser.add_argument("--sigmoid-batch", type=int, default=32768)
    parser.add_argument("--sigmoid-dim", type=int, default=768)
    parser.add_argument("--sigmoid-chunk", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--accumulation-form", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grads", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.accumulation_form:
        print(
            json.dumps(accumulation_form(args.model, args.batch, args.micro or None, args.device, args.grads))
        )
        return 0
    if args.batch % args.micro:
        parser.error("--micro must divide --batch")
    results = {}
    if args.section in ("all", "step"):
        results["step"] = dict(step_speed(args))
    if args.section in ("all", "accumulation"):
        results["accumulation"] = accumulation(args)
    if args.section in ("all", "sigmoid"):
        results["sigmoid"] = sigmoid(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
