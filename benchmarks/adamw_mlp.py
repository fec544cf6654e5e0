"""The default under AdamW on a generated classifier: a candidate tuning task, not yet a demo task.

The AdamW CNN on the digits (a judge of issue 18) is where the default failed (1.14x the best
fixed threshold over 144 seeds, before the optimizer's memory: ``second_moment``). Tuning on it
would leave it judging nothing, so this script builds a task of the same kind from generated
data: a 3-layer MLP (32-128-128-10, ReLU) classifying ten Gaussian clusters (centres N(0, 1) in
32 dimensions, fixed; noise 1.5), batches of 64, ``AdamW(lr=1e-2)``, 600 steps, scored by the
cross-entropy on 4000 held-out points (lower is better). Its gradient norms fall to about half
over the run: no drift, unlike the CNN's 1000x. ``--memorise`` gives it the CNN's regime: 30
epochs of a fixed set of 640 points (noise 1.0, batches of 32) under the CNN's schedule (a
warm-up over a tenth of the run, then a cosine decay to a tenth), where the norms fall ~1000x
with heavy tails late.

It trains each seed under no clipping, fixed thresholds 0.03-10, the default
(``AdaptiveClip(optimizer=adamw)``, given the loss as the acceptance does) and the variants
given as JSON keyword arguments of :class:`gradclip.AdaptiveClip`, and prints each one's median
metric over the seeds and its ratio to the best fixed threshold's median. One torch thread;
~1 s a run.

``{"plain": true}`` drops ``optimizer=``, as in ``variants.py``. ``results/adamw-mlp-2026-12-06.txt``
was written before :data:`gradclip.clippers.adaptive.NORMALISING_WARMUP_GROWTH`: its
"default" ramps 1% a step under AdamW, and today's default is its ``{"warmup_growth": 0.05}``.

Example:
    python benchmarks/adamw_mlp.py --seeds 16 '{"warmup_growth": 0.05}' '{"warmup_start": Infinity}'
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable

import torch

import gradclip

__all__ = ["FIXED", "main", "train"]

DIM, CLASSES, HIDDEN, STEPS, BATCH = 32, 10, 128, 600, 64
FIXED = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""The fixed thresholds of the sweep (norms start near 3 and settle near 1)."""

Build = Callable[[torch.optim.Optimizer], gradclip.Clipper | None]


MEMORISE = 640
"""``--memorise``: the training set's size (noise 1.0, batches of 32: 30 epochs in the run)."""


def _draw(n: int, gen: torch.Generator, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    return centres[y] + noise * torch.randn(n, DIM, generator=gen), y


def _warmup_cosine(step: int) -> float:
    """The learning rate's factor at ``step``: a linear warm-up over a tenth of the run, then
    a cosine decay to a tenth, as the digits CNN's schedule."""
    ramp = STEPS // 10
    if step < ramp:
        return (step + 1) / ramp
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - ramp) / (STEPS - ramp)))


def train(
    seed: int, build: Build, memorise: bool = False, beta2: float = 0.999
) -> tuple[float, float]:
    """One run: its held-out cross-entropy, and the drift of its pre-clip norms (median of the
    last tenth over the first). ``memorise``: batches of 32 from a fixed training set of
    :data:`MEMORISE` points under a warm-up and cosine schedule, instead of fresh draws of
    64 at a constant rate. ``beta2``: AdamW's (the digits CNN's is 0.95)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, beta2))
    noise, batch = (1.0, 32) if memorise else (1.5, BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine) if memorise else None
    clipper = build(optimizer)
    gen = torch.Generator().manual_seed(1000 + seed)
    fixed = _draw(MEMORISE, torch.Generator().manual_seed(7), noise) if memorise else None
    norms = []
    for _ in range(STEPS):
        if fixed is not None:
            index = torch.randint(0, MEMORISE, (batch,), generator=gen)
            x, y = fixed[0][index], fixed[1][index]
        else:
            x, y = _draw(batch, gen, noise)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if clipper is None:
            norms.append(float(gradclip.grad_norms(list(model.parameters())).total))
            optimizer.step()
        else:
            norms.append(float(clipper.step(model, optimizer, loss=loss.detach()).norm))
        if schedule is not None:
            schedule.step()
    x, y = _draw(4000, torch.Generator().manual_seed(99), noise)
    with torch.no_grad():
        metric = float(torch.nn.functional.cross_entropy(model(x), y))
    tenth = STEPS // 10
    return metric, statistics.median(norms[-tenth:]) / statistics.median(norms[:tenth])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="AdaptiveClip keyword arguments as JSON")
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--memorise", action="store_true", help="a fixed training set (see train)")
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW's beta2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    strategies: dict[str, Build] = {"no clipping": lambda o: None}
    strategies.update({f"fixed {c:g}": lambda o, c=c: gradclip.NormClip(c) for c in FIXED})
    strategies["default"] = lambda o: gradclip.AdaptiveClip(optimizer=o)
    for text in args.variants:  # {"plain": true}: without optimizer= (as variants.py)
        options = json.loads(text)
        plain = options.pop("plain", False)
        strategies[text] = lambda o, kw=options, plain=plain: gradclip.AdaptiveClip(
            optimizer=None if plain else o, **kw
        )
    metrics: dict[str, list[float]] = {name: [] for name in strategies}
    drift = []
    for seed in range(args.seeds):
        for name, build in strategies.items():
            metric, d = train(seed, build, args.memorise, args.beta2)
            metrics[name].append(metric)
            if name == "no clipping":
                drift.append(d)
    medians = {name: statistics.median(v) for name, v in metrics.items()}
    best = min(v for name, v in medians.items() if name.startswith("fixed"))
    kind = f"a fixed set of {MEMORISE}, warm-up and cosine" if args.memorise else "fresh draws"
    kind += f", beta2 {args.beta2:g}"
    print(f"AdamW MLP on generated clusters ({kind}), {args.seeds} seeds: median held-out cross-entropy, "
          f"ratio to the best fixed threshold (norm drift without clipping: "
          f"{min(drift):.2g}-{max(drift):.2g}x)")  # fmt: skip
    for name, value in medians.items():
        print(f"  {name:34s} {value:.4f}  {value / best:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
