"""ClipBERT at its real size: throughput of the two stages of retrieval, and fp32 vs bf16 agreement.

Sections (random weights of the released architecture: ResNet-50 grid CNN + BERT-base, 147M parameters):
  cnn      frames/s through ResNet-50 + grid encoder at 448x448 (one MSRVTT test video = 16 clips x 2
           frames = 32 frames)
  cross    (text, clip) pairs/s through the cross-encoder: 20 text tokens + 49 visual tokens (7x7 grid)
  project  the MSRVTT 1k-A test (1,000 texts x 1,000 videos x 16 clips) from the two rates
  bf16     the same pairs under bf16 autocast: pairs/s and max |p_fp32 - p_bf16| of the match
           probabilities
Timings are medians of rounds after a warm-up.

    python benchmarks/clipbert.py                        # CPU, small counts
    python benchmarks/clipbert.py --device cuda --frames 64 --pairs 4096 --batch 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from polyclip.domains.clipbert import ClipBert, clipbert_config, match_scores


def timed(fn, device: str, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=2, help="frames per CNN timing")
    parser.add_argument("--pairs", type=int, default=16, help="(text, clip) pairs per cross-encoder timing")
    parser.add_argument("--batch", type=int, default=16, help="pairs per cross-encoder pass")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = args.device
    model = ClipBert(clipbert_config("pretrained")).to(device).eval()
    results: dict = {"device": device, "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}
    if device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    frames = torch.randn(args.frames, 3, 448, 448, device=device) * 60

    with torch.no_grad():
        cnn_s = timed(lambda: model.vision(frames), device, args.rounds)
        grid = model.vision(frames[:2]).unflatten(0, (1, 2))  # one clip of 2 frames
        tokens = model.visual_tokens(grid)  # (1, 49, 768)
        ids = torch.randint(1000, 30000, (args.pairs, 20), device=device)
        ids[:, 0], ids[:, -1] = 101, 102
        mask = torch.ones_like(ids)

        def cross(autocast: bool = False) -> torch.Tensor:
            out = []
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                for start in range(0, args.pairs, args.batch):
                    chunk = ids[start : start + args.batch]
                    visual = tokens.expand(chunk.shape[0], -1, -1)
                    out.append(
                        model.score_tokens(chunk, mask[start : start + args.batch], visual).logits.float()
                    )
            return torch.cat(out)

        cross_s = timed(cross, device, args.rounds)
        cross_bf16_s = timed(lambda: cross(True), device, args.rounds)
        p32, p16 = match_scores(cross()), match_scores(cross(True))

    frames_per_s = args.frames / cnn_s
    pairs_per_s = args.pairs / cross_s
    results.update(
        cnn_frames_per_s=round(frames_per_s, 2),
        cross_pairs_per_s_fp32=round(pairs_per_s, 1),
        cross_pairs_per_s_bf16=round(args.pairs / cross_bf16_s, 1),
        bf16_max_abs_prob_diff=float((p32 - p16).abs().max()),
        # MSRVTT 1k-A: 1,000 videos x 32 frames through the CNN; 1,000 x 1,000 x 16 pairs
        msrvtt_1k_cnn_hours=round(1000 * 32 / frames_per_s / 3600, 3),
        msrvtt_1k_cross_hours_fp32=round(1000 * 1000 * 16 / pairs_per_s / 3600, 2),
        msrvtt_1k_cross_hours_bf16=round(1000 * 1000 * 16 / (args.pairs / cross_bf16_s) / 3600, 2),
    )
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
