"""onnxruntime against polyclip eager on the CPU: the same ViT-B/32 (random weights), both sides in one run.

(Named onnx_cpu.py, not onnx.py: a script named onnx.py would shadow the onnx package it imports.)

For each tower and batch size, the eager model (``model.encode_image`` / ``encode_text`` under
``torch.inference_mode``) and the exported folder loaded with ``polyclip.load`` (onnxruntime, CPU
execution provider, all graph optimisations) run the same inputs, rounds interleaved, medians reported.
Text batches are zero-shot-sized prompts: both sides cut a causal batch to its longest prompt.
The largest relative difference between the two sides' outputs is printed too.

    python benchmarks/onnx_cpu.py                      # image and text, batches 1 and 16
    python benchmarks/onnx_cpu.py --batches 1 16 64 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

PROMPTS = [
    "a photo of a {}.",
    "a blurry photo of the {}.",
    "a close-up photo of a large {}.",
    "an origami {} on a wooden table.",
]
NAMES = [
    "cat",
    "golden retriever",
    "fire truck",
    "harbour seal",
    "teapot",
    "snowy mountain range",
    "tram",
    "owl",
]


def interleave(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating round by round (one warm-up)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="both sides (torch threads, onnxruntime intra-op threads)",
    )
    args = parser.parse_args()

    import onnxruntime

    import polyclip
    from polyclip.factory import default_preprocess
    from polyclip.onnx import OnnxDualEncoder, export_onnx
    from polyclip.tokenizers import build_tokenizer
    from polyclip.transforms import build_preprocess

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = polyclip.create_model(args.arch).eval()
    preprocess = build_preprocess(default_preprocess(model.config))
    tokenizer = build_tokenizer({"type": "clip", "context_length": model.context_length})
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        export_onnx(model, preprocess, tokenizer, f"{folder}/onnx")
        export_s = time.perf_counter() - start
        exported = OnnxDualEncoder(f"{folder}/onnx", threads=args.threads)  # what polyclip.load builds
        print(
            f"{args.arch}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"{args.threads} threads; export took {export_s:.1f} s"
        )
        print(
            f"{'tower':<6} {'batch':>5} {'eager /s':>10} {'onnxruntime /s':>15} {'ratio':>7} {'max rel diff':>13}"
        )
        size = model.image_size
        prompts = [p.format(n) for n in NAMES for p in PROMPTS]
        for tower in ("image", "text"):
            for batch in args.batches:
                if tower == "image":
                    inputs = torch.randn(batch, 3, size, size)
                    sides = {"eager": model.encode_image, "onnx": exported.encode_image}
                else:
                    inputs = tokenizer((prompts * (batch // len(prompts) + 1))[:batch])
                    sides = {"eager": model.encode_text, "onnx": exported.encode_text}
                with torch.inference_mode():
                    want, got = sides["eager"](inputs), sides["onnx"](inputs)
                    difference = float((got - want).abs().max() / want.abs().max())
                    t = interleave(
                        {name: (lambda fn=fn: fn(inputs)) for name, fn in sides.items()}, args.rounds
                    )
                eager, onnx = batch / t["eager"], batch / t["onnx"]
                print(
                    f"{tower:<6} {batch:>5} {eager:>10.1f} {onnx:>15.1f} {onnx / eager:>6.2f}x {difference:>13.1e}"
                )


if __name__ == "__main__":
    main()
