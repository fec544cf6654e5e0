"""Full benchmark: gradclip.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_.

Every gradient set (gpt2, gpt2-bf16, resnet50, tiny2000, huge100M), p=2 and p=inf, clip and
noclip, interleaved on the same gradients (see README.md in this folder), checked against
the project's targets (``targets.py``). Takes a few minutes on 2 cores. Prints the table;
``--out PREFIX`` also writes PREFIX.txt and PREFIX.json. ``--quick``: gpt2, resnet50 and
tiny2000 with fewer repetitions (about 20 s when the machine is quiet).

Example:
    python benchmarks/bench_clip.py
    python benchmarks/bench_clip.py --quick --cases gpt2 --norm-types 2 --modes clip
    python benchmarks/bench_clip.py --reps 25 --out benchmarks/results/$(date +%F)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import harness
import render
from cases import CASES
from records import MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="gpt2, resnet50, tiny2000; 7 reps")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), metavar="CASE",
                        help=f"any of {', '.join(CASES)} (default: all, or the quick ones)")
    parser.add_argument("--norm-types", nargs="+", type=float, choices=[2.0, math.inf],
                        metavar="P", help="2 and/or inf (default: both)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="default: both")
    parser.add_argument("--reps", type=int, help="quiet repetitions per measurement (>= 1)")
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="write PREFIX.txt/.json")
    args = parser.parse_args()
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")

    cfg = harness.config(quick=args.quick, cases=args.cases, norm_types=args.norm_types,
                         modes=args.modes, reps=args.reps)  # fmt: skip
    result = harness.run(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    table = render.render(result)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.txt").write_text(table + "\n")
        Path(f"{args.out}.json").write_text(render.to_json(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
