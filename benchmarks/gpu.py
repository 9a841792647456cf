"""GPU throughput: polyclip against transformers and open_clip on the same weights, one GPU.

Every section prints both sides of its ratio, measured in this one run, on the same random weights
(polyclip's model exported to a transformers folder and to an open_clip folder, read back by each).

  peak     the dense bf16 matrix-product rate measured here (8192^3), beside the datasheet peak used
           for the percentages (--peak-tflops; default 989.4, NVIDIA's H100/H200 SXM dense bf16)
  image    image towers (ViT-B/32, ViT-B/16, ViT-L/14), bf16, a batch sweep: polyclip eager and
           compiled (max-autotune with CUDA graphs), transformers SDPA eager and torch.compile'd,
           open_clip eager and torch.compile'd; images/s and % of the peak at each side's best batch
  fp8      polyclip.load(..., quantize="fp8") against bf16 at the best batch: images/s and the
           cosine of image and text embeddings to bf16
  text     1,000 zero-shot prompts: polyclip's end-token trimming against the same tower padded to 77
  train    one AdamW (fused) step at global batch 1,024 with bf16 autocast: polyclip against
           open_clip's own model + ClipLoss on the same weights; peak memory of each; exact
           GradCache accumulation (4 micro-batches) against one big batch
  embed    the embed pipeline over generated JPEGs (decode and resize on CPU workers, pinned memory,
           copies overlapped) against the model alone on pre-made pixels
  serve    benchmarks/serve.py over HTTP with --device cuda and 64 clients (image and text queries)

    python benchmarks/gpu.py --device cuda                    # everything
    python benchmarks/gpu.py --device cuda --sections image fp8 --archs ViT-B-16
    python benchmarks/gpu.py --smoke                          # tiny models on CPU: checks the harness

A peer that cannot be imported is an error (run with --peers to leave one out on purpose).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
DATASHEET_BF16_TFLOPS = 989.4  # NVIDIA H100/H200 SXM, dense bf16 (the datasheet's 1,979 is with sparsity)
PEERS = ("transformers", "open_clip")


class Bench:
    """Shared state: device, the temporary folder of exported checkpoints, the results."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.tmp = Path(tempfile.mkdtemp(prefix="polyclip-gpu-bench-"))
        self.results: dict = {}
        self._folders: dict[str, dict[str, Path]] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_call(self, fn, rounds: int, warmup: int = 2) -> float:
        """Median seconds per call over ``rounds`` timed calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def folders(self, arch: str) -> dict[str, Path]:
        """polyclip, transformers and open_clip folders of one random model of ``arch``."""
        if arch not in self._folders:
            import polyclip
            from polyclip.checkpoints.export import export_hf, export_open_clip

            torch.manual_seed(0)
            model = polyclip.create_model(arch)
            base = self.tmp / arch
            self._folders[arch] = {
                "hf": export_hf(model, base / "hf"),
                "open_clip": export_open_clip(model, base / "open_clip"),
            }
        return self._folders[arch]

    def record(self, key: str, value) -> None:
        self.results[key] = value


def flops_per_image(encode, pixels: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encode(pixels)
    return counter.get_total_flops() / pixels.shape[0]


def require_peer(bench: Bench, name: str):
    """Import a peer library; missing is an error unless --peers left it out."""
    if name not in bench.args.peers:
        return None
    try:
        if name == "transformers":
            import transformers

            return transformers
        import open_clip

        return open_clip
    except Exception as error:  # noqa: BLE001 - the reason is printed and the run stops
        raise SystemExit(
            f"{name} cannot be imported ({type(error).__name__}: {error}); install it, or leave it out "
            f"with --peers {' '.join(p for p in bench.args.peers if p != name) or 'none'}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# the image-tower sides


def image_sides(bench: Bench, arch: str) -> dict:
    """name -> encode(pixels) for every side of the image comparison (bf16 on the bench's device)."""
    import polyclip

    dtype = torch.bfloat16
    folders = bench.folders(arch)
    sides = {}
    eager, _, _ = polyclip.load(folders["hf"], device=bench.device, dtype=dtype)
    sides["polyclip"] = eager.encode_image
    if not bench.args.no_compile:
        mode = "max-autotune" if bench.device.type == "cuda" else True
        compiled, _, _ = polyclip.load(folders["hf"], device=bench.device, dtype=dtype, compile=mode)
        sides["polyclip compiled"] = compiled.encode_image
    transformers = require_peer(bench, "transformers")
    if transformers is not None:
        reference = transformers.CLIPModel.from_pretrained(folders["hf"], attn_implementation="sdpa")
        reference = reference.eval().to(bench.device, dtype)

        def hf_encode(pixels, model=reference):
            out = model.get_image_features(pixel_values=pixels)
            return out if torch.is_tensor(out) else out.pooler_output

        sides["transformers"] = hf_encode
        if not bench.args.no_compile:
            reference.vision_model.compile(mode="max-autotune" if bench.device.type == "cuda" else None)
            sides["transformers compiled"] = hf_encode
    open_clip = require_peer(bench, "open_clip")
    if open_clip is not None:
        reference = open_clip.create_model(f"local-dir:{folders['open_clip']}").eval().to(bench.device, dtype)
        sides["open_clip"] = reference.encode_image
        if not bench.args.no_compile:
            compiled_visual = torch.compile(
                reference.visual, mode="max-autotune" if bench.device.type == "cuda" else None
            )
            sides["open_clip compiled"] = compiled_visual
    return sides


def section_peak(bench: Bench) -> None:
    n = 8192 if bench.device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=bench.device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=bench.device)
    seconds = bench.time_call(lambda: a @ b, rounds=10, warmup=3)
    measured = 2 * n**3 / seconds / 1e12
    print(
        f"\n== peak ==\nbf16 {n}^3 matrix product measured here: {measured:.1f} TFLOP/s | peak used for the "
        f"percentages: {bench.args.peak_tflops:.1f} TFLOP/s (--peak-tflops; NVIDIA's datasheet dense bf16)"
    )
    bench.record("peak", {"measured_tflops": measured, "used_tflops": bench.args.peak_tflops})


def section_image(bench: Bench) -> None:
    print("\n== image towers, bf16, batch sweep (images/s) ==")
    for arch in bench.args.archs:
        sides = image_sides(bench, arch)
        size = _image_size(arch)
        probe = torch.randn(2, 3, size, size, device=bench.device, dtype=torch.bfloat16)
        flops = flops_per_image(sides["polyclip"], probe)
        rates: dict[str, dict[int, float]] = {name: {} for name in sides}
        for batch in bench.args.batches:
            pixels = torch.randn(batch, 3, size, size, device=bench.device, dtype=torch.bfloat16)
            with torch.inference_mode():
                for name, encode in sides.items():
                    try:
                        seconds = bench.time_call(lambda e=encode: e(pixels), bench.args.rounds)
                    except torch.OutOfMemoryError:
                        torch.cuda.empty_cache()
                        continue
                    rates[name][batch] = batch / seconds
            cells = " | ".join(f"{name} {rates[name].get(batch, float('nan')):,.0f}" for name in sides)
            print(f"{arch} batch {batch:5d}: {cells}")
        best = {name: max(r.values()) for name, r in rates.items() if r}
        ours = max(v for name, v in best.items() if name.startswith("polyclip"))
        peak = bench.args.peak_tflops * 1e12
        summary = {
            name: {"images_per_s": rate, "batch": max(rates[name], key=rates[name].get),
                   "peak_fraction": rate * flops / peak}
            for name, rate in best.items()
        }  # fmt: skip
        peers = {name: v for name, v in best.items() if not name.startswith("polyclip")}
        lines = [f"{name} {v['images_per_s']:,.0f} img/s ({100 * v['peak_fraction']:.1f}% of peak, batch "
                 f"{v['batch']})" for name, v in summary.items()]  # fmt: skip
        print(f"{arch} best ({flops / 1e9:.1f} GFLOP/image): " + "; ".join(lines))
        for name, rate in peers.items():
            print(f"{arch} polyclip best / {name}: {ours / rate:.2f}x")
        bench.record(f"image/{arch}", {"gflop_per_image": flops / 1e9, "sides": summary, "sweep": rates})


def section_fp8(bench: Bench) -> None:
    import polyclip
    from polyclip.quantization import fp8_support

    print("\n== fp8 against bf16 (polyclip) ==")
    reason = fp8_support(bench.device)
    if reason is not None:
        print(f"fp8 not measured: {reason}")
        bench.record("fp8", {"skipped": reason})
        return
    for arch in bench.args.archs:
        folder = bench.folders(arch)["hf"]
        bf16, _, tokenizer = polyclip.load(folder, device=bench.device, dtype="bf16")
        fp8, _, _ = polyclip.load(folder, device=bench.device, dtype="bf16", quantize="fp8")
        size = _image_size(arch)
        batch = max(bench.args.batches)
        pixels = torch.randn(batch, 3, size, size, device=bench.device, dtype=torch.bfloat16)
        ids = tokenizer([f"a photo of a {w}, number {i}." for i in range(32) for w in ("cat", "dog")])
        with torch.inference_mode():
            t_bf16 = bench.time_call(lambda: bf16.encode_image(pixels), bench.args.rounds)
            t_fp8 = bench.time_call(lambda: fp8.encode_image(pixels), bench.args.rounds)
            cos_image = _min_cosine(bf16.encode_image(pixels), fp8.encode_image(pixels))
            cos_text = _min_cosine(bf16.encode_text(ids), fp8.encode_text(ids))
        print(
            f"{arch} batch {batch}: bf16 {batch / t_bf16:,.0f} img/s | fp8 {batch / t_fp8:,.0f} img/s | "
            f"{t_bf16 / t_fp8:.2f}x (target >= 1.4) | min cosine to bf16: image {cos_image:.5f}, text "
            f"{cos_text:.5f} (target >= 0.999)"
        )
        bench.record(f"fp8/{arch}", {"bf16_s": t_bf16, "fp8_s": t_fp8, "speedup": t_bf16 / t_fp8,
                                     "min_cos_image": cos_image, "min_cos_text": cos_text})  # fmt: skip


def section_text(bench: Bench) -> None:
    import polyclip
    from polyclip.zero_shot import encode_texts

    print("\n== text tower, 1,000 zero-shot prompts ==")
    arch = bench.args.archs[0]
    model, _, tokenizer = polyclip.load(bench.folders(arch)["hf"], device=bench.device, dtype="bf16")
    words = ["tabby cat", "golden retriever", "sports car", "oak tree", "red fox", "blue whale",
             "fire truck", "espresso", "violin", "lighthouse"]  # fmt: skip
    prompts = [f"a photo of a {w}, number {i}." for i in range(100) for w in words]
    ids = tokenizer(prompts).to(bench.device)

    def padded():
        x = model.text.forward_features(ids)  # all 77 positions, as a tower that does not trim
        return model.text.proj(x[torch.arange(len(ids), device=bench.device), model.text.pool_positions(ids)])

    with torch.inference_mode():
        t_padded = bench.time_call(padded, bench.args.rounds)
        t_trimmed = bench.time_call(lambda: encode_texts(model, tokenizer, prompts), bench.args.rounds)
    print(
        f"padded to 77 {len(prompts) / t_padded:,.0f} prompts/s | polyclip trimmed {len(prompts) / t_trimmed:,.0f}"
        f" prompts/s | {t_padded / t_trimmed:.2f}x (target >= 3)"
    )
    bench.record("text", {"padded_s": t_padded, "trimmed_s": t_trimmed, "speedup": t_padded / t_trimmed})


def section_train(bench: Bench) -> None:
    import polyclip
    from polyclip.losses import ClipLoss
    from polyclip.tokenizers import ClipTokenizer
    from polyclip.train.step import ContrastiveForward, StepInputs, forward_backward

    print(f"\n== training step, global batch {bench.args.train_batch}, bf16 autocast, fused AdamW ==")
    device = bench.device
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)  # noqa: E731
    hyper = {"lr": 1e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2}
    if device.type == "cuda":
        hyper["fused"] = True
    open_clip = require_peer(bench, "open_clip")
    for arch in bench.args.train_archs:
        size = _image_size(arch)
        batch = bench.args.train_batch
        pixels = torch.randn(batch, 3, size, size, device=device)
        tokens = ClipTokenizer()([f"a photo of item {i} on a table" for i in range(batch)]).to(device)
        ours, _, _ = polyclip.load(bench.folders(arch)["hf"], device=device)
        ours.train()
        inputs = StepInputs(ContrastiveForward(ours), ClipLoss(), False, autocast, contextlib.nullcontext)
        ours_opt = torch.optim.AdamW(ours.parameters(), **hyper)

        def ours_step(micro=None):
            ours_opt.zero_grad(set_to_none=True)
            forward_backward(inputs, pixels, tokens, micro_batch_size=micro)
            ours_opt.step()

        theirs = theirs_opt = None
        steps = {"polyclip": ours_step, "polyclip GradCache x4": lambda: ours_step(batch // 4)}
        if open_clip is not None:
            theirs = (
                open_clip.create_model(f"local-dir:{bench.folders(arch)['open_clip']}").to(device).train()
            )
            theirs_loss = open_clip.loss.ClipLoss()
            theirs_opt = torch.optim.AdamW(theirs.parameters(), **hyper)

            def theirs_step():
                theirs_opt.zero_grad(set_to_none=True)
                with autocast():
                    image, text, scale = theirs(pixels, tokens)[:3]
                    loss = theirs_loss(image, text, scale)
                loss.backward()
                theirs_opt.step()

            steps["open_clip"] = theirs_step
        times, peaks = {}, {}
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name] = bench.time_call(step, bench.args.train_rounds, warmup=2)
            peaks[name] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        cells = " | ".join(f"{n} {1000 * t:.0f} ms, peak {peaks[n]:.1f} GiB" for n, t in times.items())
        print(f"{arch}: {cells}")
        if "open_clip" in times:
            print(
                f"{arch} open_clip / polyclip step time: {times['open_clip'] / times['polyclip']:.2f}x (target >= 1.2)"
            )
        ratio = times["polyclip GradCache x4"] / times["polyclip"]
        print(f"{arch} GradCache x4 / one batch step time: {ratio:.2f}x (target <= 1.1)")
        bench.record(f"train/{arch}", {"step_s": times, "peak_gib": peaks})
        # free this architecture's models and optimisers before the next one is measured
        steps.clear()
        ours = ours_opt = inputs = theirs = theirs_opt = None  # noqa: F841
        if device.type == "cuda":
            torch.cuda.empty_cache()


def section_embed(bench: Bench) -> None:
    import numpy as np
    from PIL import Image

    import polyclip
    from polyclip.encode import embed_images, list_images

    count = bench.args.jpegs
    print(f"\n== embed pipeline, {count:,} JPEGs (640x480) ==")
    folder = bench.tmp / "jpegs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)  # smooth content, as photos compress
        Image.fromarray(base).resize((640, 480), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    arch = bench.args.archs[0]
    model, preprocess, _ = polyclip.load(bench.folders(arch)["hf"], device=bench.device, dtype="bf16")
    paths = list_images([folder])
    batch = bench.args.embed_batch
    pixels = torch.stack([preprocess(paths[0])] * batch).to(bench.device, torch.bfloat16)

    def model_only():
        with torch.inference_mode():
            for _ in range(len(paths) // batch):
                model.encode_image(pixels)

    def pipeline():
        for _ in embed_images(model, preprocess, paths, batch_size=batch, workers=bench.args.workers):
            pass

    t_model = bench.time_call(model_only, rounds=1, warmup=1)
    t_pipeline = bench.time_call(pipeline, rounds=1, warmup=0)
    cores = os.cpu_count()
    print(
        f"model only {len(paths) / t_model:,.0f} img/s | embed pipeline {len(paths) / t_pipeline:,.0f} img/s "
        f"({bench.args.workers or 'default'} decode workers on {cores} cores) | pipeline / model-only "
        f"{t_model / t_pipeline:.2f}"
    )
    bench.record("embed", {"model_only_s": t_model, "pipeline_s": t_pipeline, "images": len(paths)})


def section_serve(bench: Bench) -> None:
    print("\n== serving over HTTP (benchmarks/serve.py) ==")
    command = [sys.executable, str(HERE / "serve.py"), "--sections", "http", "--device", str(bench.device),
               "--clients", str(bench.args.clients)]  # fmt: skip
    if bench.args.smoke:
        command += ["--model", "tiny-vit"]
    completed = subprocess.run(command, text=True)
    bench.record("serve", {"exit_code": completed.returncode})
    if completed.returncode:
        raise SystemExit(f"benchmarks/serve.py failed with exit code {completed.returncode}")


SECTIONS = {
    "peak": section_peak,
    "image": section_image,
    "fp8": section_fp8,
    "text": section_text,
    "train": section_train,
    "embed": section_embed,
    "serve": section_serve,
}


def _image_size(arch: str) -> int:
    from polyclip.models import get_architecture

    return get_architecture(arch).vision.image_size


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float()).min())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--archs", nargs="+", default=["ViT-B-32", "ViT-B-16", "ViT-L-14"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--peak-tflops", type=float, default=DATASHEET_BF16_TFLOPS)
    parser.add_argument("--no-compile", action="store_true", help="eager sides only (faster)")
    parser.add_argument("--train-archs", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--train-batch", type=int, default=1024)
    parser.add_argument("--train-rounds", type=int, default=5)
    parser.add_argument("--jpegs", type=int, default=20_000)
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="decode workers of the embed section")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models and sizes on CPU: checks the harness"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
        args.archs = ["tiny-vit"]
        args.train_archs = ["tiny-vit"]
        args.batches = [2, 4]
        args.rounds = 1
        args.train_batch = 8
        args.train_rounds = 1
        args.jpegs = 16
        args.embed_batch = 4
        args.no_compile = True
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    name = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else "CPU"
    print(f"{name} | torch {torch.__version__} | sections {' '.join(args.sections)}")
    for section in args.sections:
        SECTIONS[section](bench)
    if args.json:
        args.json.write_text(json.dumps(bench.results, indent=2, default=str))


if __name__ == "__main__":
    main()
