"""Embedded training tasks where gradients explode or spike, and one runner for all of them.

Every task generates its data in-process from a seed (a local :class:`torch.Generator`; the
global RNG is neither read nor advanced), trains a small model on the CPU and records, per
step, the training loss, the gradient norm before and after clipping, the threshold, the
size of the update and whether the step was clipped. What each task shows, calibrated with
``gradclip.clip_grad_norm_`` as the fixed clipper (torch 2.13 CPU, one thread, seeds 0-2;
the numbers are in each task's ``reference``):

* ``rnn-addition/violent`` and ``rnn-addition/moderate`` (Pascanu et al. 2013): a tanh RNN
  with 64 units on the addition problem, SGD with momentum 0.9, recurrent weights
  orthogonal x rho. Predicting the mean scores a validation MSE of 0.167. T=30 rather than
  the classic 50 keeps a full run under 10 s on one thread; the explosions are the same.
  *Violent* (lr 0.05, rho 1.2): without clipping the weights are non-finite within about
  50 steps; a fixed ``max_norm=1`` stays stable (0.02-0.19) and 0.3 learns the task
  (0.013); a fixed 100 ends at an MSE of hundreds to thousands. *Moderate* (lr 0.02,
  rho 1.1): without clipping the result is a seed lottery (0.007-0.35); a fixed 1 learns on
  every seed (0.005-0.017); a fixed 10 is as much a lottery as none.
* ``adam-spikes`` (the AdaGC / ZClip mechanism): teacher-student MLP regression with Adam;
  four batches have targets x1000 (a data glitch). A glitch inflates Adam's second moment
  for thousands of steps: without clipping the final clean test MSE is 7-9x the glitch-free
  reference (:data:`REFERENCES`); a fixed 1 or 0.1 protects fully; a fixed 100 is too loose
  (3x the reference).
* ``sgd-heavy-tail`` (Zhang et al. 2020): linear regression with Student-t(1.5) noise
  (infinite variance), plain SGD from w = 0. Without clipping the weights end further from
  w* than w = 0 is (1.4-2.0 vs 1.0); clipping helps the more the lower the threshold, down
  to a point: the error is U-shaped in ``max_norm`` (50: 1.4, 5: 0.7, 0.5: 0.23, 0.1: 0.1,
  0.01: 0.67), because a threshold that is too low makes every step tiny. Where the bottom
  lies depends on the budget: 0.1 at the full 4000 steps, 0.5 at the quick 800.

Quick runs (``quick=True``: 200, 200, 500 and 800 steps) take about a second each and keep
the ordering: no clipping is clearly worse than a good fixed threshold on every task.

Example:
    >>> import gradclip
    >>> from gradclip.demo.tasks import run
    >>> result = run("sgd-heavy-tail", lambda m: gradclip.clip_grad_norm_(m.parameters(), 0.5),
    ...              steps=50)
    >>> len(result.losses)
    50

References:
    Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural networks.
    ICML 2013. Zhang, Karimireddy, Veit, Kim, Reddi, Kumar, Sra. Why are adaptive methods
    good for attention models? NeurIPS 2020. Wang et al. AdaGC, arXiv 2502.11034.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from gradclip.functional import grad_norms

__all__ = [
    "REFERENCES",
    "TASKS",
    "AdditionConfig",
    "ClipFn",
    "HeavyTailConfig",
    "RunResult",
    "SpikesConfig",
    "Task",
    "TaskConfig",
    "resolve",
    "run",
]

ClipFn = Callable[[nn.Module], object]
"""Called with the model after ``backward()`` and before ``optimizer.step()``.

It may clip the gradients in place, and may return ``None``, a 0-dim tensor (the pre-clip
total norm, as ``clip_grad_norm_`` returns) or an object with a ``norm`` attribute (the
pre-clip total norm) and optionally ``post_norm``, ``threshold``, ``clipped``, ``finite``
and ``skipped`` (a :class:`gradclip.ClipStats` has all of them). When ``skipped`` is true
the runner does not call ``optimizer.step()``, as :meth:`gradclip.Clipper.step` does.
"""


class _Problem(Protocol):
    """One instantiated task: model, optimizer, data stream and metric."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def loss(self, step: int) -> Tensor:
        """Training loss of the batch of ``step`` (draws the batch)."""
        ...

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (metrics that average over the run)."""
        ...

    def metric(self) -> float:
        """The task's final metric (lower is better)."""
        ...


# ---------------------------------------------------------------------------------------
# rnn-addition


@dataclass(frozen=True)
class AdditionConfig:
    """The addition problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013).

    Each input step is (value ~ U(0, 1), marker); one marker lies in the first 10% of the
    sequence, one in the second half; the target is the sum of the two marked values.

    Attributes:
        lr: SGD learning rate (momentum ``momentum``).
        rho: scale of the orthogonal recurrent matrix at initialisation.
        hidden: RNN width.
        length: sequence length T.
        batch: training batch size.
        momentum: SGD momentum.
        val_size: number of fixed validation sequences.
        data_seed: seed of the validation set (the same for every run seed).
    """

    lr: float
    rho: float
    hidden: int = 64
    length: int = 30
    batch: int = 64
    momentum: float = 0.9
    val_size: int = 1000
    data_seed: int = 1_000_003


class _AdditionRNN(nn.Module):
    def __init__(self, hidden: int, rho: float, gen: torch.Generator):
        super().__init__()
        # built on "meta", then materialised: torch's default init would draw from the global RNG
        self.rnn = nn.RNN(
            2, hidden, nonlinearity="tanh", batch_first=True, device="meta"
        ).to_empty(device="cpu")
        self.head = nn.utils.skip_init(nn.Linear, hidden, 1)
        bound = 1.0 / math.sqrt(hidden)
        with torch.no_grad():
            nn.init.uniform_(self.rnn.weight_ih_l0, -bound, bound, generator=gen)
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=rho, generator=gen)
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.zero_()
            nn.init.uniform_(self.head.weight, -bound, bound, generator=gen)
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, length, 2) -> prediction (batch,)."""
        _, h = self.rnn(x)
        return self.head(h[-1]).squeeze(-1)


def _addition_batch(n: int, length: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    values = torch.rand(n, length, generator=gen)
    first = torch.randint(0, max(1, length // 10), (n,), generator=gen)
    second = torch.randint(length // 2, length, (n,), generator=gen)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target


class _AdditionProblem:
    def __init__(self, cfg: AdditionConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        self.gen = torch.Generator().manual_seed(seed)
        self.model = _AdditionRNN(cfg.hidden, cfg.rho, self.gen).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        val_gen = torch.Generator().manual_seed(cfg.data_seed)
        val_x, val_y = _addition_batch(cfg.val_size, cfg.length, val_gen)
        self.val_x, self.val_y = val_x.to(device), val_y.to(device)

    def loss(self, step: int) -> Tensor:
        x, y = _addition_batch(self.cfg.batch, self.cfg.length, self.gen)
        return nn.functional.mse_loss(self.model(x.to(self.device)), y.to(self.device))

    def after_step(self, step: int) -> None:
        pass

    def metric(self) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(self.model(self.val_x), self.val_y).item()


# ---------------------------------------------------------------------------------------
# adam-spikes


@dataclass(frozen=True)
class SpikesConfig:
    """Teacher-student regression with Adam and rare corrupted batches.

    The teacher is a tanh MLP ``dim -> teacher_hidden -> 1`` (fixed by ``data_seed``);
    the student a tanh MLP ``dim -> hidden -> hidden -> 1``; inputs are N(0, I). The
    batches at ``glitch_at`` (fractions of the run's steps) have their targets multiplied by
    ``glitch_scale``; the metric is the MSE on clean test data.

    Attributes:
        lr: Adam learning rate.
        glitch_at: positions of the corrupted batches, as fractions of the step count
            (so a shorter run keeps the same pattern); empty for a glitch-free reference.
        glitch_scale: factor applied to the targets of a corrupted batch.
        dim, teacher_hidden, hidden: layer widths.
        batch: training batch size.
        test_size: number of clean test points.
        data_seed: seed of the teacher and the test set (the same for every run seed).
    """

    lr: float = 1e-3
    glitch_at: tuple[float, ...] = (1 / 6, 2 / 6, 3 / 6, 4 / 6)
    glitch_scale: float = 1000.0
    dim: int = 32
    teacher_hidden: int = 64
    hidden: int = 128
    batch: int = 64
    test_size: int = 2000
    data_seed: int = 2_000_003


def _mlp(sizes: tuple[int, ...], gen: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        with torch.no_grad():
            nn.init.normal_(linear.weight, 0.0, 1.0 / math.sqrt(fan_in), generator=gen)
            linear.bias.zero_()
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class _SpikesProblem:
    def __init__(self, cfg: SpikesConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        data_gen = torch.Generator().manual_seed(cfg.data_seed)
        teacher = _mlp((cfg.dim, cfg.teacher_hidden, 1), data_gen)
        self.teacher = teacher.requires_grad_(False).to(device)
        self.test_x = torch.randn(cfg.test_size, cfg.dim, generator=data_gen).to(device)
        self.test_y = self.teacher(self.test_x)
        self.gen = torch.Generator().manual_seed(seed)
        self.model = _mlp((cfg.dim, cfg.hidden, cfg.hidden, 1), self.gen).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.glitches = {round(f * steps) for f in cfg.glitch_at}

    def loss(self, step: int) -> Tensor:
        x = torch.randn(self.cfg.batch, self.cfg.dim, generator=self.gen).to(self.device)
        y = self.teacher(x)
        if step in self.glitches:
            y = y * self.cfg.glitch_scale
        return nn.functional.mse_loss(self.model(x), y)

    def after_step(self, step: int) -> None:
        pass

    def metric(self) -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(self.model(self.test_x), self.test_y).item()


# ---------------------------------------------------------------------------------------
# sgd-heavy-tail


@dataclass(frozen=True)
class HeavyTailConfig:
    """Linear regression ``y = x . w* + noise`` with Student-t noise, plain SGD from w = 0.

    ``x ~ N(0, I_dim)``, ``||w*|| = 1`` (so w = 0 scores 1.0), loss ``mean((x.w - y)^2) / 2``.
    With ``df <= 2`` the noise has infinite variance.

    Attributes:
        lr: SGD learning rate.
        df: degrees of freedom of the Student-t noise.
        dim: number of features.
        batch: training batch size.
        window: fraction of the run, at its end, over which ``||w - w*||`` is averaged.
        data_seed: seed of w* (the same for every run seed).
    """

    lr: float = 0.05
    df: float = 1.5
    dim: int = 50
    batch: int = 16
    window: float = 0.125
    data_seed: int = 3_000_003


def _standard_gamma(alpha: float, n: int, gen: torch.Generator) -> Tensor:
    """n samples of Gamma(alpha, 1) from ``gen`` (Marsaglia & Tsang 2000, boosted if alpha < 1)."""
    boost = alpha < 1
    a = alpha + 1 if boost else alpha
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(0)
    while out.numel() < n:
        m = 2 * (n - out.numel()) + 16
        x = torch.randn(m, generator=gen)
        v = (1 + c * x) ** 3
        u = torch.rand(m, generator=gen)
        ok = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.clamp_min(1e-30).log())
        out = torch.cat([out, (d * v)[ok]])
    out = out[:n]
    if boost:
        out = out * torch.rand(n, generator=gen).pow(1 / alpha)
    return out


def _student_t(df: float, n: int, gen: torch.Generator) -> Tensor:
    """n samples of Student-t(df): z / sqrt(chi2(df) / df), chi2(df) = 2 Gamma(df / 2)."""
    chi2 = 2 * _standard_gamma(df / 2, n, gen)
    return torch.randn(n, generator=gen) / (chi2 / df).sqrt()


class _HeavyTailProblem:
    def __init__(self, cfg: HeavyTailConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        w_star = torch.randn(cfg.dim, generator=torch.Generator().manual_seed(cfg.data_seed))
        self.w_star = (w_star / w_star.norm()).to(device)
        self.gen = torch.Generator().manual_seed(seed)
        noise = _student_t(cfg.df, steps * cfg.batch, self.gen).view(steps, cfg.batch)
        self.noise = noise.to(device)
        self.model = nn.utils.skip_init(nn.Linear, cfg.dim, 1, bias=False).to(device)
        with torch.no_grad():
            self.model.weight.zero_()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.start = steps - max(1, round(cfg.window * steps))
        self.distances: list[float] = []

    def loss(self, step: int) -> Tensor:
        x = torch.randn(self.cfg.batch, self.cfg.dim, generator=self.gen).to(self.device)
        y = x @ self.w_star + self.noise[step]
        return 0.5 * nn.functional.mse_loss(self.model(x).squeeze(-1), y)

    def after_step(self, step: int) -> None:
        if step >= self.start:
            with torch.no_grad():
                self.distances.append((self.model.weight[0] - self.w_star).norm().item())

    def metric(self) -> float:
        if not self.distances:  # stopped before the window: measure the final weights
            with torch.no_grad():
                return (self.model.weight[0] - self.w_star).norm().item()
        return math.fsum(self.distances) / len(self.distances)


# ---------------------------------------------------------------------------------------
# tasks


TaskConfig = AdditionConfig | SpikesConfig | HeavyTailConfig
"""The hyperparameters of a task; their type selects the problem."""

_PROBLEMS: dict[type, Callable[..., _Problem]] = {
    AdditionConfig: _AdditionProblem,
    SpikesConfig: _SpikesProblem,
    HeavyTailConfig: _HeavyTailProblem,
}


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
            twice the 0.42 that predicting 0 scores), 10 for sgd-heavy-tail (ten times w = 0).
        reference: what trivial / unclipped / well-clipped runs score, for reports.
        fixed: three fixed ``max_norm`` for ``gradclip demo``: too low, good (the best of the
            quality benchmark's sweep 0.1, 0.3, ..., 100 at full length) and too high.
        config: the hyperparameters (:class:`AdditionConfig`, :class:`SpikesConfig` or
            :class:`HeavyTailConfig`); ``dataclasses.replace`` it to make a variant.
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
}
"""Control runs by task key: ``run(REFERENCES["adam-spikes"], None)`` trains without the
corrupted batches (its result's ``task`` is ``"adam-spikes/clean"``)."""


# ---------------------------------------------------------------------------------------
# the runner


@dataclass
class RunResult:
    """What one run of a task did, step by step.

    Per-step lists hold one entry per step actually run (a run stops early once the
    parameters are non-finite). NaN marks a value the clip function did not report.

    Attributes:
        task: the task key.
        seed: the run seed.
        steps: steps actually run.
        planned_steps: steps the run was asked for.
        losses: training loss per step (corrupted batches included).
        metric: the task's final metric (lower is better); ``inf`` when the parameters
            became non-finite.
        diverged: the metric is non-finite or above the task's ``failure_level``.
        nonfinite_steps: steps whose loss, pre-clip gradient norm or update was NaN/inf
            (or that the clip function reported as not ``finite``).
        skipped_steps: steps where the clip function asked to skip the optimizer step.
        pre_norms: total gradient 2-norm before clipping.
        post_norms: total norm after clipping (``pre_norms`` without a clip function).
        thresholds: the clipping threshold (NaN without a clip function or when unreported).
        update_norms: ``||theta_after - theta_before||`` of the optimizer step (0 if skipped).
        clipped: whether the step was clipped (reported ``clipped``, else
            ``post_norm < pre_norm``; False when unknown).
        wall_time_s: wall time of the whole run, metric included.
    """

    task: str
    seed: int
    steps: int
    planned_steps: int
    losses: list[float]
    metric: float
    diverged: bool
    nonfinite_steps: int
    skipped_steps: int
    pre_norms: list[float]
    post_norms: list[float]
    thresholds: list[float]
    update_norms: list[float]
    clipped: list[bool]
    wall_time_s: float


_NAN = float("nan")


def _as_float(value: object) -> float:
    if value is None:
        return _NAN
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return _NAN
        return float(value.detach().reshape(()).item())
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _NAN


def _as_bool(value: object) -> bool | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return bool(value.detach().reshape(-1).any().item()) if value.numel() else None
    return bool(value)


def _flat(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def resolve(task: str | Task) -> Task:
    """The :class:`Task` for a key of :data:`TASKS` (or the task itself)."""
    if isinstance(task, Task):
        return task
    if task in TASKS:
        return TASKS[task]
    raise KeyError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def run(
    task: str | Task,
    clip: ClipFn | None,
    *,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Train ``task`` once with ``clip`` between ``backward()`` and ``optimizer.step()``.

    The pre-clip norm comes from the clip function when it reports one (a returned 0-dim
    tensor or ``.norm``); otherwise the runner measures it with :func:`gradclip.grad_norms`
    before calling ``clip`` (on the first step it always does, since it cannot know yet;
    from then on only while the clip function reports nothing). Non-finite losses and
    gradients do not stop the run, as in unprotected training; once the parameters are
    non-finite it stops early, with ``metric = inf`` and ``diverged = True``.

    Args:
        task: a key of :data:`TASKS` or a :class:`Task`.
        clip: the clip function (see :data:`ClipFn`), or None for no clipping.
        seed: seeds the initialisation and the training batches (the validation / test
            data and the teacher are fixed per task).
        steps: steps to run; default ``task.steps`` (``task.quick_steps`` if ``quick``).
        quick: use the task's quick step count.
        progress: called as ``progress(done, total)`` after every step.
        device: where the model and its data live (the data is generated on the CPU from
            the seed and moved, so a seed means the same data on every device).

    Returns:
        A :class:`RunResult`. Identical seeds give identical results (for a given number
        of torch threads).
    """
    spec = resolve(task)
    total = steps if steps is not None else (spec.quick_steps if quick else spec.steps)
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise ValueError(f"`steps` must be a positive int, got {total!r}")
    start = time.perf_counter()
    problem = _PROBLEMS[type(spec.config)](spec.config, seed, total, torch.device(device))
    model, optimizer = problem.model, problem.optimizer
    params = [p for p in model.parameters() if p.requires_grad]

    losses: list[float] = []
    pre_norms: list[float] = []
    post_norms: list[float] = []
    thresholds: list[float] = []
    update_norms: list[float] = []
    clipped: list[bool] = []
    nonfinite = skipped_steps = 0
    measure = True
    exploded = False
    before = _flat(params)
    for step in range(total):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(step)
        loss.backward()
        measured = grad_norms(params).total.item() if (clip is None or measure) else _NAN
        out = clip(model) if clip is not None else None

        norm = post = threshold = _NAN
        was_clipped = finite = skip = None
        if isinstance(out, Tensor):
            norm = _as_float(out)
        elif out is not None:
            norm = _as_float(getattr(out, "norm", None))
            post = _as_float(getattr(out, "post_norm", None))
            threshold = _as_float(getattr(out, "threshold", None))
            was_clipped = _as_bool(getattr(out, "clipped", None))
            finite = _as_bool(getattr(out, "finite", None))
            skip = _as_bool(getattr(out, "skipped", None))
        reported = not math.isnan(norm) or (finite is not None and not finite)
        if not reported:
            norm = measured
        measure = not reported
        if clip is None:
            post = norm
        if was_clipped is None:
            was_clipped = bool(post < norm)

        loss_value = loss.item()
        if finite is None:
            finite = math.isfinite(norm)

        if skip:
            skipped_steps += 1
            update = 0.0
        else:
            optimizer.step()
            after = _flat(params)
            update = (after - before).norm().item()
            if not math.isfinite(update) and not bool(torch.isfinite(after).all()):
                exploded = True
            before = after
        if not (finite and math.isfinite(loss_value) and math.isfinite(update)):
            nonfinite += 1
        problem.after_step(step)

        losses.append(loss_value)
        pre_norms.append(norm)
        post_norms.append(post)
        thresholds.append(threshold)
        update_norms.append(update)
        clipped.append(was_clipped)
        if progress is not None:
            progress(step + 1, total)
        if exploded:
            break

    metric = math.inf if exploded else problem.metric()
    if not math.isfinite(metric):
        metric = math.inf
    return RunResult(
        task=spec.key,
        seed=seed,
        steps=len(losses),
        planned_steps=total,
        losses=losses,
        metric=metric,
        diverged=not metric <= spec.failure_level,
        nonfinite_steps=nonfinite,
        skipped_steps=skipped_steps,
        pre_norms=pre_norms,
        post_norms=post_norms,
        thresholds=thresholds,
        update_norms=update_norms,
        clipped=clipped,
        wall_time_s=time.perf_counter() - start,
    )
