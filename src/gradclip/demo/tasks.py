"""The tasks of ``gradclip demo``: which problem, at which settings, and what it shows.

A :class:`Task` names one configuration of an embedded problem
(:mod:`gradclip.demo.problems`) with its step counts, its metric, the level above which a
run counts as diverged, and three fixed thresholds to compare against. What each task
shows, calibrated with ``gradclip.clip_grad_norm_`` as the fixed clipper (torch 2.13 CPU,
one thread, seeds 0-2; the numbers are in each task's ``reference``):

* ``rnn-addition/violent`` and ``rnn-addition/moderate``: a tanh RNN with 64 units on the
  addition problem, SGD with momentum 0.9. Predicting the mean scores a validation MSE of
  0.167. T=30 rather than the classic 50 keeps a full run under 10 s on one thread; the
  explosions are the same. *Violent* (lr 0.05, rho 1.2): without clipping the weights are
  non-finite within about 50 steps; a fixed ``max_norm=1`` stays stable (0.02-0.19) and
  0.3 learns the task (0.013); a fixed 100 ends at an MSE of hundreds to thousands.
  *Moderate* (lr 0.02, rho 1.1): without clipping the result is a seed lottery
  (0.007-0.35); a fixed 1 learns on every seed (0.005-0.017); a fixed 10 is as much a
  lottery as none.
* ``adam-spikes``: four batches have targets x1000. Without clipping the final clean test
  MSE is 7-9x the glitch-free reference (:data:`REFERENCES`); a fixed 1 or 0.1 protects
  fully; a fixed 100 is too loose (3x the reference).
* ``sgd-heavy-tail``: Student-t(1.5) noise. Without clipping the weights end further from
  w* than w = 0 is (1.4-2.0 vs 1.0); clipping helps the more the lower the threshold, down
  to a point: the error is U-shaped in ``max_norm`` (50: 1.4, 5: 0.7, 0.5: 0.23, 0.1: 0.1,
  0.01: 0.67), because a threshold that is too low makes every step tiny. Where the bottom
  lies depends on the budget: 0.1 at the full 4000 steps, 0.5 at the quick 800.
* ``sgd-label-noise``: linear regression with SGD and momentum; six batches in the second
  half of the run have their label noise x1000. The gradient norm falls from about 2 to
  0.0013 as the weights converge, so a fixed threshold low enough to make a corrupted
  batch harmless (0.01) also slows the start, and any higher one lets each corrupted batch
  push the weights off by ``lr * threshold`` per step of momentum: without clipping the
  error ends 50x the clean run's; skipping the six batches (``spikes="skip"``) is the clean
  run. Where a clipper's threshold falls well below the typical norm late in the run
  (AdaptiveClip backs off after the corrupted batches), its smaller steps also average out
  the label noise, which no skip does. At the quick 400 steps the corrupted batches come
  while the norms still fall by decades, and the detector's window is too wide to see them.

* ``muon-adamw``: ``torch.optim.Muon`` for the 2-D hidden weights, AdamW for the rest, a
  loss whose gradients are imbalanced (NVIDIA/Megatron-LM#5394): a global clip starves
  the classifier, clipping the AdamW groups on their own norm (gradclip's default policy
  with Muon, :meth:`gradclip.Clipper.step`) does not: seeds 0-3, validation KL (untrained
  3.7) none 1.37-1.41, ``NormClip(1.0)`` 1.37-1.42, a global clip of 1.0 1.80-1.91
  (``benchmarks/results/muon-2026-12-04.txt``).

Four tasks on real data (:mod:`gradclip.demo.real_problems`; nothing downloads), set up as
practitioners train, each at the learning rate that does best under the industry default
``max_norm=1.0`` among three tried. They judge the defaults in the quality benchmark's
acceptance (``benchmarks/acceptance.py``); none was used to choose one:

* ``lm-transformer``: a character-level causal transformer on the Python docs, AdamW with
  warm-up and cosine decay (the LLM recipe). Clipping hardly matters: a flat landscape.
* ``lstm-text``: a character-level LSTM on the same text, plain SGD at lr 10 (lr 30 blows
  up: 16 nats without clipping, 4.2 with ``max_norm=1``).
* ``cnn-digits/sgd`` and ``cnn-digits/adamw``: a small CNN on scikit-learn's 8x8 digits,
  SGD with momentum, or AdamW with warm-up and cosine decay.

Quick runs (``quick=True``: 200, 200, 500 and 800 steps; 300 for ``muon-adamw``, 100 for
the real-data tasks) take about a second each and keep the ordering: no clipping is clearly
worse than a good fixed threshold on every task. They are too short to rank the clippers: on the RNN tasks one seed's quick result can differ from
its full-length one by several times.

Example:
    >>> from gradclip.demo.tasks import TASKS, resolve
    >>> list(TASKS)[:6]
    ['rnn-addition/violent', 'rnn-addition/moderate', 'adam-spikes', 'sgd-heavy-tail', 'muon-adamw', 'sgd-label-noise']
    >>> list(TASKS)[6:]
    ['lm-transformer', 'lstm-text', 'cnn-digits/sgd', 'cnn-digits/adamw']
    >>> task = resolve("adam-spikes")
    >>> task.steps, task.quick_steps, task.fixed
    (3000, 500, (0.003, 0.1, 100.0))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from gradclip.demo.problems import (
    AdditionConfig,
    HeavyTailConfig,
    LabelNoiseConfig,
    MuonConfig,
    SpikesConfig,
    TaskConfig,
)
from gradclip.demo.real_problems import DigitsConfig, TextConfig

__all__ = ["REFERENCES", "TASKS", "Task", "resolve"]


@dataclass(frozen=True)
class Task:
    """One embedded training task.

    Attributes:
        name: the task family, e.g. ``"rnn-addition"``.
        regime: the variant within the family (``"violent"``), ``""`` for a single-variant
            task.
        description: one sentence for reports.
        steps: step count of a full run (the quality benchmark).
        quick_steps: step count of a quick run (tests, ``gradclip demo --quick``).
        metric_name: what :attr:`RunResult.metric` measures (lower is better).
        failure_level: a metric above this (or non-finite) counts as diverged: 1.0 for
            rnn-addition (six times the constant predictor), 1.0 for adam-spikes (over
            twice the 0.42 that predicting 0 scores), 10 for sgd-heavy-tail (ten times w = 0),
            1.0 for sgd-label-noise (w = 0).
        reference: what trivial / unclipped / well-clipped runs score, for reports.
        fixed: three fixed ``max_norm`` for ``gradclip demo``: too low, good (the best of the
            quality benchmark's sweep 0.1, 0.3, ..., 100 at full length) and too high.
        config: the hyperparameters (:class:`AdditionConfig`, :class:`SpikesConfig`,
            :class:`HeavyTailConfig`, :class:`MuonConfig`, or a real-data config of
            :mod:`gradclip.demo.real_problems`); ``dataclasses.replace`` it to make a
            variant.
    """

    name: str
    regime: str
    description: str
    steps: int
    quick_steps: int
    metric_name: str
    failure_level: float
    reference: str
    fixed: tuple[float, float, float]
    config: TaskConfig = field(repr=False)

    @property
    def key(self) -> str:
        """``"name/regime"``, or ``name`` for a single-variant task: the key in :data:`TASKS`."""
        return f"{self.name}/{self.regime}" if self.regime else self.name


_RNN_DESCRIPTION = (
    "tanh RNN (64 units) on the addition problem (T=30), SGD momentum 0.9, "
    "recurrent weights orthogonal x {rho}, lr {lr}"
)

TASKS: dict[str, Task] = {
    task.key: task
    for task in (
        Task(
            name="rnn-addition",
            regime="violent",
            description=_RNN_DESCRIPTION.format(rho=1.2, lr=0.05),
            steps=2000,
            quick_steps=200,
            metric_name="validation MSE",
            failure_level=1.0,
            reference=(
                "constant predictor 0.167; seeds 0-2: none inf (non-finite by step ~50), "
                "fixed 100: 360-3200, fixed 1: 0.02-0.19, fixed 0.3: 0.012-0.015"
            ),
            fixed=(0.03, 0.3, 10.0),
            config=AdditionConfig(lr=0.05, rho=1.2),
        ),
        Task(
            name="rnn-addition",
            regime="moderate",
            description=_RNN_DESCRIPTION.format(rho=1.1, lr=0.02),
            steps=2000,
            quick_steps=200,
            metric_name="validation MSE",
            failure_level=1.0,
            reference=(
                "constant predictor 0.167; seeds 0-2: none 0.007-0.35 (seed lottery), "
                "fixed 10: 0.01-0.21, fixed 1: 0.005-0.017"
            ),
            fixed=(0.3, 3.0, 30.0),
            config=AdditionConfig(lr=0.02, rho=1.1),
        ),
        Task(
            name="adam-spikes",
            regime="",
            description=(
                "teacher-student tanh MLP regression with Adam (lr 1e-3); four batches have "
                "targets x1000"
            ),
            steps=3000,
            quick_steps=500,
            metric_name="clean test MSE",
            failure_level=1.0,
            reference=(
                "glitch-free reference (REFERENCES['adam-spikes']) 0.0055-0.0059; seeds 0-2: "
                "none 0.039-0.054, fixed 100: 0.016-0.017, fixed 1: 0.0054-0.0057, "
                "fixed 0.1: 0.0048-0.0050"
            ),
            fixed=(0.003, 0.1, 100.0),
            config=SpikesConfig(),
        ),
        Task(
            name="sgd-heavy-tail",
            regime="",
            description=(
                "linear regression (d=50) with Student-t(1.5) noise, plain SGD lr 0.05 from w=0"
            ),
            steps=4000,
            quick_steps=800,
            metric_name="mean ||w - w*|| over the last 12.5% of steps",
            failure_level=10.0,
            reference=(
                "w = 0 scores 1.0; seeds 0-2: none 1.4-2.0, fixed 50: 1.3-1.5, fixed 5: 0.70, "
                "fixed 0.5: 0.22-0.24, fixed 0.1: 0.09-0.11, fixed 0.01: 0.67"
            ),
            fixed=(0.01, 0.1, 10.0),
            config=HeavyTailConfig(),
        ),
        Task(
            name="muon-adamw",
            regime="",
            description=(
                "two-task model under torch.optim.Muon (2-D hidden weights) + AdamW (embedding, "
                "head, biases); one task's loss in raw units (x1e4) makes the total norm ~1e7; "
                "every clipper leaves the Muon groups out (gradclip's default)"
            ),
            steps=1500,
            quick_steps=300,
            metric_name="validation KL of the token classifier (nats)",
            failure_level=10.0,
            reference=(
                "untrained 3.7; seeds 0-3: none 1.37-1.41, default policy at max_norm 1 "
                "(Muon left out) 1.37-1.42, global clip 1 over everything 1.80-1.91"
            ),
            fixed=(0.1, 1.0, 100.0),
            config=MuonConfig(),
        ),
        Task(
            name="sgd-label-noise",
            regime="",
            description=(
                "linear regression (d=50), SGD momentum 0.9 lr 0.01 from w=0, label noise 0.001; "
                "six late batches have label noise x1000"
            ),
            steps=2000,
            quick_steps=400,
            metric_name="mean ||w - w*|| over the last 12.5% of steps",
            failure_level=1.0,
            reference=(
                "w = 0 scores 1.0; seeds 0-1: clean run (REFERENCES['sgd-label-noise']) and "
                "skip 0.0003, none 0.016, fixed 10 0.016, fixed 1 0.012, fixed 0.1 0.0013, "
                "fixed 0.01 0.00035, fixed 0.003 0.65 (too slow to learn)"
            ),
            fixed=(0.003, 0.01, 10.0),
            config=LabelNoiseConfig(),
        ),
        # Real data, as practitioners train: these tasks judge the defaults (the quality
        # benchmark's acceptance), none of them was used to choose one.
        Task(
            name="lm-transformer",
            regime="",
            description=(
                "character-level causal transformer (2 blocks, width 32) on the Python docs "
                "(pydoc_data), AdamW lr 1e-2, betas (0.9, 0.95), 10% warm-up then cosine decay"
            ),
            steps=500,
            quick_steps=100,
            metric_name="validation cross-entropy (nats per character)",
            failure_level=3.0,
            reference=(
                "medians of seeds 0-5: none 1.98, fixed 0.1 1.99, fixed 1 1.99, fixed 10 1.98 "
                "(flat: Adam with a schedule hardly needs clipping); untrained 4.5"
            ),
            fixed=(1.0, 10.0, 100.0),
            config=TextConfig(model="transformer", lr=1e-2, width=32, context=32, batch=16),
        ),
        Task(
            name="lstm-text",
            regime="",
            description=(
                "character-level LSTM (64 units) on the Python docs (pydoc_data), plain SGD "
                "lr 10 (high, as in Merity et al.'s AWD-LSTM recipe)"
            ),
            steps=800,
            quick_steps=100,
            metric_name="validation cross-entropy (nats per character)",
            failure_level=3.0,
            reference=(
                "medians of seeds 0-5: none 1.66, fixed 0.1 1.71, fixed 0.3 1.59, fixed 1 1.65, "
                "fixed 3 1.66; untrained 4.5"
            ),
            fixed=(0.03, 0.3, 10.0),
            config=TextConfig(model="lstm", lr=10.0, width=64, layers=1, context=32, batch=16),
        ),
        Task(
            name="cnn-digits",
            regime="sgd",
            description=(
                "two-layer CNN on scikit-learn's 8x8 handwritten digits, SGD momentum 0.9 lr "
                "0.1"
            ),
            steps=600,
            quick_steps=100,
            metric_name="test cross-entropy",
            failure_level=2.3,
            reference=(
                "medians of seeds 0-5: none 0.044, fixed 0.1 0.16, fixed 0.3 0.053, fixed 1 "
                "0.045, fixed 3 0.047, fixed 10 0.044 (clipping never fires at 10); untrained 2.3"
            ),
            fixed=(0.1, 10.0, 100.0),
            config=DigitsConfig(optimizer="sgd", lr=0.1),
        ),
        Task(
            name="cnn-digits",
            regime="adamw",
            description=(
                "two-layer CNN on scikit-learn's 8x8 handwritten digits, AdamW lr 1e-2, "
                "10% warm-up then cosine decay"
            ),
            steps=600,
            quick_steps=100,
            metric_name="test cross-entropy",
            failure_level=2.3,
            reference=(
                "medians of seeds 0-5: none 0.033, fixed 0.1 0.038, fixed 0.3 0.033, fixed 1 "
                "0.030, fixed 3 0.028, fixed 10 0.033; untrained 2.3"
            ),
            fixed=(0.1, 3.0, 100.0),
            config=DigitsConfig(optimizer="adamw", lr=1e-2),
        ),
    )
}
"""The embedded tasks by key (``"rnn-addition/violent"``, ``"adam-spikes"``, ...)."""

REFERENCES: dict[str, Task] = {
    "adam-spikes": dataclasses.replace(
        TASKS["adam-spikes"],
        regime="clean",
        description="adam-spikes without the corrupted batches (the reference)",
        config=SpikesConfig(glitch_at=()),
    ),
    "sgd-label-noise": dataclasses.replace(
        TASKS["sgd-label-noise"],
        regime="clean",
        description="sgd-label-noise without the corrupted batches (the reference)",
        config=LabelNoiseConfig(corrupt_at=()),
    ),
}
"""Control runs by task key: ``run(REFERENCES["adam-spikes"], None)`` trains without the
corrupted batches (its result's ``task`` is ``"adam-spikes/clean"``)."""


def resolve(task: str | Task) -> Task:
    """The :class:`Task` for a key of :data:`TASKS` (or the task itself).

    Raises:
        KeyError: no task has that key (the message lists the keys).
        TypeError: ``task`` is neither a string nor a :class:`Task`.

    Example:
        >>> resolve("sgd-heavy-tail").metric_name
        'mean ||w - w*|| over the last 12.5% of steps'
    """
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise TypeError(f"`task` must be a task key (a str) or a Task, got {type(task).__name__}")
    if task in TASKS:
        return TASKS[task]
    raise KeyError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
