"""Made-up runs in the shape of a saved acceptance result (``benchmarks/acceptance.py``), for
the scripts that read one (``variants.py``, ``holdout.py``)."""

from __future__ import annotations


def saved_runs(task: str, metrics: dict[str, list[float]]) -> dict:
    """``{"runs": [...]}``: per strategy, one run per metric (seed = its index); a metric
    above 1 counts as diverged."""
    return {"runs": [{"task": task, "strategy": s, "seed": k, "metric": m, "diverged": m > 1}
                     for s, ms in metrics.items() for k, m in enumerate(ms)]}  # fmt: skip
