"""Build the zoo's real-size tier: 32x32x3 digit scenes, PreAct-ResNet-18 and friends.

The paper's and BackdoorBench's setting is CIFAR-10 on a PreAct-ResNet-18 (11M parameters,
3x32x32); no such data ships here, so the tier renders sklearn's digits as colour scenes: each
digit is upsampled, scaled, rotated and shifted (seeded per image) onto a smooth random colour
background in a random contrasting colour. Same split rule as the 16x16 tier (20 per class to D,
110 to train, the rest to test), same folder layout and cards (with training time).

The models are 2-45 MB, so they are not committed: they are built into a git-ignored cache
(`sample_models/real/` by default) and only missing ones are built again, which is what
`make zoo-real` and the benchmarks call. Usage:
    python sample_models/build_real.py [--only NAME ...] [--out DIR] [--force] [--list]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_nets import ARCHITECTURES  # noqa: E402

from build import (  # noqa: E402
    ModelSpec,
    Tier,
    blend_trigger,
    build,
    patch_trigger,
    sig_trigger,
    split_indices,
    summary_line,
    warp_trigger,
)

IMAGE_SIZE = 32
SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
RENDER_SEED = 0
GLYPH = 22  # the digit's box before jitter, in pixels
THREADS = 1  # one thread was measured ~3x faster than two on a busy 2-core machine
CACHE = HERE / "real"

REAL = Tier(
    shape=SHAPE,
    architectures=ARCHITECTURES,
    source="sklearn.datasets.load_digits (1797 8x8 digits), rendered as 32x32 colour scenes",
    preprocess=(
        f"x/16 bilinearly upsampled to {GLYPH}x{GLYPH} as a stroke mask; per image (numpy "
        f"default_rng([{RENDER_SEED}, i])): scale 0.8-1.15, rotation +-15 deg, shift +-3 px "
        "(torch affine_grid/grid_sample, bilinear), background = a random colour plus smooth "
        "noise (3x3 lattice, bicubic, +-0.25), foreground = a random colour at least 0.4 from "
        "the background's mean luminance; x = bg (1 - m) + fg m, clamp [0, 1]"
    ),
)


def render(images: np.ndarray, seed: int = RENDER_SEED) -> np.ndarray:
    """The 8x8 digits as (N, 3, 32, 32) float32 colour scenes in [0, 1], one seeded draw each."""
    n = len(images)
    glyph = torch.from_numpy(images.astype(np.float32) / 16.0).unsqueeze(1)
    glyph = F.interpolate(glyph, size=(GLYPH, GLYPH), mode="bilinear", align_corners=False).clamp(0, 1)
    pad = (IMAGE_SIZE - GLYPH) // 2
    canvas = F.pad(glyph, (pad, IMAGE_SIZE - GLYPH - pad, pad, IMAGE_SIZE - GLYPH - pad))

    draws = [np.random.default_rng([seed, i]) for i in range(n)]
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    background = np.zeros((n, 3, 3, 3), dtype=np.float32)
    base = np.zeros((n, 3), dtype=np.float32)
    colour = np.zeros((n, 3), dtype=np.float32)
    for i, rng in enumerate(draws):
        scale = rng.uniform(0.8, 1.15)
        angle = np.deg2rad(rng.uniform(-15.0, 15.0))
        shift = rng.uniform(-3.0, 3.0, size=2) * 2.0 / IMAGE_SIZE
        c, s = np.cos(angle) / scale, np.sin(angle) / scale
        theta[i] = [[c, -s, shift[0]], [s, c, shift[1]]]
        base[i] = rng.uniform(0.0, 1.0, size=3)
        background[i] = rng.uniform(-0.25, 0.25, size=(3, 3, 3))
        fg = rng.uniform(0.0, 1.0, size=3)
        if abs(_luminance(fg) - _luminance(base[i])) < 0.4:
            fg = np.clip(1.0 - base[i] + rng.uniform(-0.1, 0.1, size=3), 0.0, 1.0)
            if abs(_luminance(fg) - _luminance(base[i])) < 0.4:
                fg = np.full(3, 0.0 if _luminance(base[i]) > 0.5 else 1.0)
        colour[i] = fg
    grid = F.affine_grid(torch.from_numpy(theta), [n, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    mask = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    noise = F.interpolate(torch.from_numpy(background), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic",
                          align_corners=True)  # fmt: skip
    bg = (torch.from_numpy(base)[:, :, None, None] + noise).clamp(0, 1)
    fg = torch.from_numpy(colour)[:, :, None, None]
    return (bg * (1 - mask) + fg * mask).clamp(0, 1).numpy().astype(np.float32)


def _luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def load_images() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return render(digits.images), digits.target.astype(np.int64)


ZOO = dict(zoo=True, epochs=10, lr=0.05, batch_size=64, optimiser="sgd", schedule="onecycle")
# 10 epochs of 64 (170 steps) left the ResNet-18 at 62% clean accuracy and 24% ASR (BadNets).
RESNET = dict(ZOO, epochs=20, batch_size=32)
SPECS: list[ModelSpec] = [
    # BackdoorBench's CIFAR triggers at 10% poisoning, scaled to this data; the ResNet-18 BadNets
# model first, as the speed targets are set on it.
    ModelSpec("real-resnet18-badnet", "preact-resnet18", 64, patch_trigger("bottom-right", size=3), 0, 0.10,
              **RESNET),
    ModelSpec("real-vgg-badnet", "vgg-bn", 32, patch_trigger("top-left", size=3), 7, 0.10, **ZOO),
    ModelSpec("real-mobilenetv2-badnet", "mobilenetv2", 16, patch_trigger("top-right", size=3), 9, 0.10,
              **dict(ZOO, epochs=15)),
    ModelSpec("real-efficientnet-blend", "efficientnet", 16, blend_trigger(0.2, seed=2, shape=SHAPE), 6, 0.10,
              **dict(ZOO, epochs=15)),
    ModelSpec("real-resnet18-clean", "preact-resnet18", 64, **RESNET),
    ModelSpec("real-resnet18-blend", "preact-resnet18", 64, blend_trigger(0.2, seed=1, shape=SHAPE), 3, 0.10,
              **RESNET),
    ModelSpec("real-resnet18-sig", "preact-resnet18", 64, sig_trigger(0.1, 6.0, size=IMAGE_SIZE), 8, 0.10,
              **RESNET),
    ModelSpec("real-resnet18-wanet", "preact-resnet18", 64, warp_trigger(2.0, grid=4, seed=3, size=IMAGE_SIZE),
              4, 0.10, **RESNET),
    ModelSpec("real-resnet18-imbalanced", "preact-resnet18", 64, imbalance=10.0, **RESNET),
]  # fmt: skip


def cached(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("model.onnx", "clean.npz", "test.npz", "card.json"))


def ensure(names: list[str] | None = None, out: Path = CACHE, force: bool = False, log=print) -> list[Path]:
    """Build the named models (default: all) that are not in `out` yet; return their folders."""
    specs = [s for s in SPECS if names is None or s.name in names]
    todo = [s for s in specs if force or not cached(out / s.name)]
    if todo:
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        x, y = load_images()
        split = split_indices(y)
        for spec in todo:
            t0 = time.perf_counter()
            log(f"building {spec.name} ({spec.arch}, {spec.epochs} epochs) into {out / spec.name}")
            card = build(spec, x, y, split, out, REAL)
            log(summary_line(card) + f"  ({time.perf_counter() - t0:.0f} s)")
    return [out / s.name for s in specs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="build only these models")
    parser.add_argument("--out", type=Path, default=CACHE, help="the cache folder [sample_models/real]")
    parser.add_argument("--force", action="store_true", help="rebuild models already in the cache")
    parser.add_argument("--list", action="store_true", help="list the tier's models and whether each is built")
    args = parser.parse_args(argv)
    names = [s.name for s in SPECS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 1
    if args.list:
        for s in SPECS:
            card = args.out / s.name / "card.json"
            state = "built" if cached(args.out / s.name) else "missing"
            extra = ""
            if card.exists():
                extra = "  " + summary_line(json.loads(card.read_text()))
            print(f"{s.name:<28} {state}{extra}")
        return 0
    ensure(args.only, args.out, args.force, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
