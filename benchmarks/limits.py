"""CLIP's three limitations (fine-grained classes, distribution shift, social bias) answered on the model
``polyclip demo`` trains, each answer printed beside its baseline in one run.

Starts from a ``polyclip demo --out DIR`` folder (``--model DIR``), or trains one first (300 steps, as
the demo). Every dataset is rendered by the demo's shapes renderer, so the run is offline and a pure
function of the seed.

1. Fine-grained: four shades of blue that the demo's captions never separate (they only say "blue").
   Zero-shot (the prompts name the shades) is the baseline; then few-shot nearest centroid (BioCLIP's
   protocol) and the Tip-Adapter-style cache at 1/4/16 shots: with CLIP's fixed scale 100 (what the
   adapter did before: inert on a model whose own scale is ~10), with the model's own scale, and with
   alpha/beta searched on a validation split. 5 support draws per k.
2. Distribution shift: the 12 colour x shape combinations the demo never trained on, fine-tuned on
   their images on the light background (`finetune` recipe from the demo folder: sigmoid loss, the
   model's own), tested there (in distribution) and on mid-grey and dark backgrounds (shifts).
   WiSE-FT mixes (alpha 0 = zero-shot .. 1 = fine-tuned), after a gentle and a strong fine-tune, with
   the ResNet tower's BatchNorm statistics interpolated (the reference's way) or re-estimated on the
   fine-tuning images (`recompute_batchnorm`). Curves in ``OUT/wise_ft.png``.
3. Bias: a fine-tune that plants an association (every circle caption says "happy", every square
   "sad") and a control fine-tune on the same images without those words. WEAT on images (X circles,
   Y squares) against prompts (A happy, B sad), and an unrelated attribute pair (left / right), with
   the one- and two-sided permutation p-values; the reversed test (X squares) shows why the one-sided
   p-value alone misreads a strong negative association.

Usage:
    python benchmarks/limits.py                       # trains the demo model first (~1-2 min on 2 cores)
    python benchmarks/limits.py --model polyclip-demo --out polyclip-limits
    python benchmarks/limits.py --section fine_grained
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

SHADES = {  # the captions of the demo only ever say "blue"
    "pale blue": (150, 175, 245),
    "light blue": (95, 130, 235),
    "deep blue": (35, 75, 215),
    "navy blue": (20, 35, 125),
}
BACKGROUNDS = {"light (trained)": None, "mid grey": (128, 128, 128), "dark": (45, 45, 45)}
ALPHAS = [round(a, 2) for a in np.linspace(0.0, 1.0, 11)]
SHOTS = (1, 4, 16)


# ----------------------------------------------------------------------------------------- data


def _render_folder(root: Path, classes: dict, per_class: int, seed: int, size: int = 32) -> Path:
    """ImageFolder ``root/<class>/<n>.png``; ``classes``: name -> (colour, shape or None for any, rgb or
    None, background or None)."""
    from polyclip.train.demo.shapes import SHAPES, random_spec, render

    for index, (name, (colour, shape, rgb, background)) in enumerate(classes.items()):
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, index])
        for n in range(per_class):
            spec = random_spec(rng, [(colour, s) for s in ([shape] if shape else SHAPES)])
            image = render(
                spec, size, np.random.default_rng([seed, index, n]), rgb=rgb, background=background
            )
            image.save(folder / f"{n:04d}.png", compress_level=1)
    return root


def _render_pairs(root: Path, specs: list, seed: int, caption, size: int = 32) -> Path:
    """JSONL training pairs of rendered ``specs`` (colour, shape, background), captioned by ``caption(spec)``."""
    from polyclip.train.demo.shapes import random_spec, render

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 99])
    with (root / "train.jsonl").open("w") as handle:
        for n, (colour, shape, background) in enumerate(specs):
            spec = random_spec(rng, [(colour, shape)])
            path = images / f"{n:06d}.png"
            render(spec, size, np.random.default_rng([seed, 98, n]), background=background).save(
                path, compress_level=1
            )
            handle.write(json.dumps({"image": str(path.relative_to(root)), "captions": caption(spec)}) + "\n")
    return root / "train.jsonl"


# ----------------------------------------------------------------------------------------- helpers


def _load(folder: Path):
    import polyclip

    model, preprocess, tokenizer = polyclip.load(folder)
    return model.eval(), preprocess, tokenizer


def _pixels(preprocess, folder: Path):
    """(pixels (N, 3, S, S), labels (N,), class names) of an ImageFolder, preprocessed once."""

    from polyclip.eval import read_image_folder

    labelled = read_image_folder(folder)
    pixels = torch.stack([preprocess(labelled.images.load(i)) for i in range(len(labelled.images))])
    return pixels, labelled.labels, [name.replace("_", " ") for name in labelled.class_names]


@torch.no_grad()
def _accuracy(model, tokenizer, test, templates: list[str]) -> float:
    from polyclip.eval import build_zero_shot_weights

    pixels, labels, names = test
    features = torch.cat([model.encode_image(chunk, normalize=True) for chunk in pixels.split(256)])
    weights = build_zero_shot_weights(model, tokenizer, names, templates)  # (C, E)
    return float(((features @ weights.T).argmax(dim=1).numpy() == labels).mean())


def _fine_tune(start: Path, data: Path, out: Path, steps: int, lr: float, seed: int) -> Path:
    from polyclip.train.launch import build_config
    from polyclip.train.trainer import train

    overrides = [
        f"data.train={data}", f"schedule.max_steps={steps}", "schedule.epochs=none", f"optim.lr={lr}",
        "schedule.warmup_steps=5", "data.num_workers=0", "log.progress=false", "log.console=false",
        "log.plots=false", f"seed={seed}", "checkpoint.keep_last=1", "device=cpu",
    ]  # fmt: skip
    config = build_config("finetune", overrides, output_dir=out, start_from=start)
    return train(config).model_dir


def _train_pixels(preprocess, data: Path, limit: int = 512) -> torch.Tensor:
    from PIL import Image

    lines = data.read_text().splitlines()[:limit]
    return torch.stack(
        [preprocess(Image.open(data.parent / json.loads(line)["image"]).convert("RGB")) for line in lines]
    )


def _row(label: str, values: list, width: int = 30) -> str:
    return f"  {label:<{width}}" + "".join(
        f"{v:>9.1%}" if isinstance(v, float) else f"{v:>9}" for v in values
    )


# ----------------------------------------------------------------------------------------- 1. fine-grained


def fine_grained(model_dir: Path, out: Path, seed: int) -> dict:
    from polyclip.eval import read_image_folder
    from polyclip.eval.features import EncodeConfig
    from polyclip.eval.few_shot import TipAdapterConfig, model_logit_scale
    from polyclip.eval.runner import FewShotConfig, RunConfig, run_few_shot

    classes = {name: ("blue", None, rgb, None) for name, rgb in SHADES.items()}  # any shape
    root = out / "fine_grained"
    train = read_image_folder(_render_folder(root / "train", classes, 40, seed))
    val = read_image_folder(_render_folder(root / "val", classes, 20, seed + 1))
    test = read_image_folder(_render_folder(root / "test", classes, 40, seed + 2))
    model = _load(model_dir)
    run = RunConfig(encode=EncodeConfig(batch_size=256, num_workers=0))
    templates = ["a {} shape"]

    def report(method, tip=None, with_val=False):
        config = FewShotConfig(method=method, shots=SHOTS, folds=5, seed=seed, templates=templates)
        if tip is not None:
            config.tip = tip
        result = run_few_shot([("demo", *model)], train, test, config, run, val if with_val else None)
        return result.results[0].metrics

    rows = {
        "nearest centroid": report("centroid"),
        "Tip-Adapter, scale 100 (before)": report("tip_adapter", TipAdapterConfig(zero_shot_scale=100.0)),
        "Tip-Adapter, model's scale": report("tip_adapter"),
        "Tip-Adapter, searched on val": report("tip_adapter", with_val=True),
    }
    zero_shot = rows["nearest centroid"]["0shot_accuracy"]
    scale = model_logit_scale(model[0])
    print(f"\n1. Fine-grained: {len(SHADES)} shades of blue the captions never separate (chance 25%)")
    print(f"   model logit scale exp(t) = {scale:.1f}; test 40 images/class; 5 support draws per k")
    print(_row("", ["0-shot", *(f"{k}-shot" for k in SHOTS)]))
    print(_row("zero-shot (baseline)", [zero_shot] + ["-"] * len(SHOTS)))
    for name, metrics in rows.items():
        print(_row(name, [zero_shot, *(metrics[f"{k}shot_accuracy"] for k in SHOTS)]))
    searched = rows["Tip-Adapter, searched on val"]
    print(
        "   searched alpha / beta: "
        + ", ".join(
            f"{k}-shot {searched[f'{k}shot_alpha']:.2f} / {searched[f'{k}shot_beta']:.2f}" for k in SHOTS
        )
    )
    return {
        "logit_scale": scale,
        "zero_shot": zero_shot,
        **{n: {k: m[f"{k}shot_accuracy"] for k in SHOTS} for n, m in rows.items()},
    }


# ----------------------------------------------------------------------------------------- 2. shift


def distribution_shift(model_dir: Path, out: Path, seed: int, strengths: dict) -> dict:
    from polyclip.train.demo import TEMPLATES
    from polyclip.train.demo.shapes import held_out_combinations
    from polyclip.train.wise_ft import recompute_batchnorm, wise_ft

    held = held_out_combinations()
    root = out / "shift"
    tests = {}
    for number, (name, background) in enumerate(BACKGROUNDS.items()):
        classes = {f"{c} {s}": (c, s, None, background) for c, s in held}
        tests[name] = _render_folder(root / "test" / name.split()[0], classes, 20, seed + 10 + number)
    rng = np.random.default_rng([seed, 7])
    specs = [(*held[int(rng.integers(len(held)))], None) for _ in range(768)]
    data = _render_pairs(
        root / "train", specs, seed, lambda spec: [f"a {spec.colour} {spec.shape}", spec.caption()]
    )
    zero_shot, preprocess, tokenizer = _load(model_dir)
    test_pixels = {name: _pixels(preprocess, folder) for name, folder in tests.items()}
    bn_pixels = _train_pixels(preprocess, data).split(64)  # the fine-tuning distribution
    templates = list(TEMPLATES)
    curves = {}
    print(
        "\n2. Distribution shift: the 12 never-trained colour x shape pairs, fine-tuned on the light background"
    )
    for strength, (steps, lr) in strengths.items():
        tuned = _load(_fine_tune(model_dir, data, root / f"run_{strength}", steps, lr, seed))[0]
        for batchnorm in ("interpolated (reference)", "re-estimated"):
            curve = {name: [] for name in tests}
            for alpha in ALPHAS:
                mixed = wise_ft(zero_shot, tuned, alpha).eval()
                if batchnorm == "re-estimated":
                    recompute_batchnorm(mixed, bn_pixels)
                for name, test in test_pixels.items():
                    curve[name].append(_accuracy(mixed, tokenizer, test, templates))
            curves[strength, batchnorm] = curve
            _print_curve(strength, steps, lr, batchnorm, curve)
    _plot(curves, out / "wise_ft.png")
    print(f"   curves: {out / 'wise_ft.png'}")
    return {
        "alphas": ALPHAS,
        "curves": {f"{s} / {b}": c for (s, b), c in curves.items()},
        "fine_tunes": strengths,
    }


def _print_curve(strength: str, steps: int, lr: float, batchnorm: str, curve: dict) -> None:
    print(
        f"   {strength} fine-tune ({steps} steps, lr {lr:g}), BatchNorm statistics {batchnorm}; chance 8.3%"
    )
    print(_row("alpha", [f"{a:g}" for a in ALPHAS], 18))
    for name, values in curve.items():
        print(_row(name, values, 18))
    for name, values in curve.items():
        best = int(np.argmax(values))
        verdict = (
            "beats both ends" if values[best] > max(values[0], values[-1]) else "does not beat both ends"
        )
        print(
            f"     {name}: zero-shot {values[0]:.1%}, fine-tuned {values[-1]:.1%}, best mix {values[best]:.1%} "
            f"at alpha {ALPHAS[best]:g} ({verdict})",
            flush=True,
        )


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strengths = sorted({s for s, _ in curves}, key=list(dict.fromkeys(s for s, _ in curves)).index)
    figure, axes = plt.subplots(1, len(strengths), figsize=(6 * len(strengths), 4.2), squeeze=False)
    colours = dict(zip(BACKGROUNDS, ("tab:blue", "tab:orange", "tab:red")))
    for axis, strength in zip(axes[0], strengths):
        for (s, batchnorm), curve in curves.items():
            if s != strength:
                continue
            style = "-" if batchnorm.startswith("interpolated") else "--"
            for name, values in curve.items():
                axis.plot(
                    ALPHAS,
                    values,
                    style,
                    color=colours[name],
                    marker="o",
                    markersize=3,
                    label=f"{name}, BN {batchnorm}",
                )
        axis.set_title(f"WiSE-FT after a {strength} fine-tune")
        axis.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
        axis.set_ylabel("accuracy on the 12 held-out pairs")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ----------------------------------------------------------------------------------------- 3. bias


def bias(model_dir: Path, out: Path, seed: int, steps: int) -> dict:
    from polyclip.eval.bias import BiasTest, EmbeddingSet
    from polyclip.eval.features import EncodeConfig
    from polyclip.eval.runner import BiasConfig, RunConfig, run_bias
    from polyclip.train.demo.shapes import COLOURS, SHAPES

    root = out / "bias"
    rng = np.random.default_rng([seed, 5])
    specs = [
        (list(COLOURS)[int(rng.integers(6))], SHAPES[int(rng.integers(len(SHAPES)))], None)
        for _ in range(1024)
    ]
    mood = {"circle": "happy ", "square": "sad "}

    def planted(spec):
        return [
            f"a {mood.get(spec.shape, '')}{spec.colour} {spec.shape}",
            f"a {mood.get(spec.shape, '')}{spec.caption()[2:]}",
        ]

    def control(spec):
        return [f"a {spec.colour} {spec.shape}", spec.caption()]

    models = {"demo model": model_dir}
    for name, caption in (("control fine-tune", control), ("planted fine-tune", planted)):
        data = _render_pairs(root / name.split()[0], specs, seed, caption)
        models[name] = _fine_tune(model_dir, data, root / f"run_{name.split()[0]}", steps, 3e-4, seed)
    targets = {}
    for shape in ("circle", "square"):
        classes = {f"{c} {shape}": (c, shape, None, None) for c in COLOURS}
        targets[shape] = _render_folder(root / "targets" / shape, classes, 5, seed + 20)
    happy = ["happy", "a happy shape", "a happy thing"]
    sad = ["sad", "a sad shape", "a sad thing"]
    left = ["a shape on the left", "something on the left", "on the left"]
    right = ["a shape on the right", "something on the right", "on the right"]

    def images(shape):
        return EmbeddingSet(shape + "s", image_folder=targets[shape])

    tests = [
        BiasTest(
            "circles_vs_squares_happy_vs_sad",
            images("circle"),
            images("square"),
            EmbeddingSet("happy", happy),
            EmbeddingSet("sad", sad),
        ),
        BiasTest(
            "squares_vs_circles_happy_vs_sad",
            images("square"),
            images("circle"),
            EmbeddingSet("happy", happy),
            EmbeddingSet("sad", sad),
        ),
        BiasTest(
            "circles_vs_squares_left_vs_right",
            images("circle"),
            images("square"),
            EmbeddingSet("left", left),
            EmbeddingSet("right", right),
        ),
    ]
    run = RunConfig(encode=EncodeConfig(batch_size=256, num_workers=0))
    loaded = [(name, *_load(folder)) for name, folder in models.items()]
    report = run_bias(loaded, tests, BiasConfig(num_permutations=20000, seed=seed), run)
    print(
        f"\n3. Bias: WEAT on 30 circle vs 30 square images; planted = circles captioned 'happy', squares 'sad' ({steps} steps)"
    )
    print(f"  {'test':<36}{'model':<20}{'effect':>8}{'p (1-sided)':>13}{'p (2-sided)':>13}")
    table = {}
    for result in report.results:
        for test in tests:
            m = result.metrics
            effect, one, two = (
                m[f"{test.name}_effect_size"],
                m[f"{test.name}_p_value"],
                m[f"{test.name}_p_value_two_sided"],
            )
            table[f"{result.model} / {test.name}"] = {
                "effect": effect,
                "p_one_sided": one,
                "p_two_sided": two,
            }
            print(f"  {test.name:<36}{result.model:<20}{effect:>8.2f}{one:>13.4f}{two:>13.4f}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="a `polyclip demo --out` folder (default: train one)"
    )
    parser.add_argument("--out", type=Path, default=Path("polyclip-limits"))
    parser.add_argument("--section", choices=("all", "fine_grained", "shift", "bias"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gentle", default="40,1e-4", help="steps,lr of the gentle fine-tune")
    parser.add_argument("--strong", default="100,1e-3", help="steps,lr of the strong fine-tune")
    parser.add_argument("--bias-steps", type=int, default=100)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is None:
        from polyclip.train.demo import run_demo

        model_dir = args.out / "demo"
        print(f"training the demo model into {model_dir} ...")
        run_demo(seed=args.seed, out=model_dir, verbose=False, threads=args.threads)
    strengths = {
        name: (int(v.split(",")[0]), float(v.split(",")[1]))
        for name, v in (("gentle", args.gentle), ("strong", args.strong))
    }
    results = {"model": str(model_dir)}
    if args.section in ("all", "fine_grained"):
        results["fine_grained"] = fine_grained(model_dir, args.out, args.seed)
    if args.section in ("all", "shift"):
        results["shift"] = distribution_shift(model_dir, args.out, args.seed, strengths)
    if args.section in ("all", "bias"):
        results["bias"] = bias(model_dir, args.out, args.seed, args.bias_steps)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "limits.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['seconds']} s; numbers in {args.out / 'limits.json'}")


if __name__ == "__main__":
    main()
