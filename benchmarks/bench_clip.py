"""Full benchmark: gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_.

Every gradient set (gpt2, gpt2-bf16, resnet50, tiny2000, huge100M), p=2 and p=inf, clip and
noclip, interleaved on the same gradients (see README.md in this folder). Takes a few
minutes on 2 cores. Prints the table; ``--out PREFIX`` also writes PREFIX.txt and
PREFIX.json.

Example:
    python benchmarks/bench_clip.py
    python benchmarks/bench_clip.py --reps 25 --out benchmarks/results/$(date +%F)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradclip import bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help="quiet repetitions per measurement (>= 1)")
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="write PREFIX.txt/.json")
    args = parser.parse_args()
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")

    result = bench.run(
        bench.config(reps=args.reps), progress=lambda line: print(line, file=sys.stderr)
    )
    table = bench.render(result)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.txt").write_text(table + "\n")
        Path(f"{args.out}.json").write_text(bench.to_json(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
