"""The embedded training problems: small models whose gradients explode or spike.

Each problem is built from a frozen config and a seed. It generates its data in-process
from a local :class:`torch.Generator` (the global RNG is neither read nor advanced), holds
a model and its optimizer, draws the batch of each step, and scores the trained model:

* :class:`AdditionConfig`: a tanh RNN on the addition problem (Hochreiter & Schmidhuber
  1997; Pascanu et al. 2013), SGD with momentum, recurrent weights orthogonal x ``rho``.
  ``rho > 1`` makes the gradients explode through time.
* :class:`SpikesConfig`: teacher-student MLP regression with Adam, where a few batches have
  their targets multiplied by 1000 (a data glitch, the AdaGC / ZClip mechanism). One glitch
  inflates Adam's second moment for thousands of steps.
* :class:`HeavyTailConfig`: linear regression with Student-t noise of infinite variance,
  plain SGD from w = 0 (Zhang et al. 2020).
* :class:`MuonConfig`: a two-task model trained with ``torch.optim.Muon`` (its 2-D hidden
  weights) and AdamW (embedding, head, biases), whose gradients are imbalanced: one task's
  loss is in raw units, so one tower's gradients are ~1e7 times the other's
  (NVIDIA/Megatron-LM#5394). A global clip coefficient then starves the other tower.
* :class:`LabelNoiseConfig`: linear regression with SGD and momentum, where a few batches
  late in the run have their label noise multiplied by 1000 (corrupted data). A clipped
  corrupted batch is still a full-size step in a meaningless direction, taken when the
  gradients have become small; a skipped one is no step at all.

:func:`build_problem` picks the problem from the config's type. Which settings make a task
of ``gradclip demo``, and what each scores, is :mod:`gradclip.demo.tasks`; training one is
:mod:`gradclip.demo.runner`.

Example:
    >>> import torch
    >>> from gradclip.demo.problems import HeavyTailConfig, build_problem
    >>> problem = build_problem(HeavyTailConfig(), seed=0, steps=10, device=torch.device("cpu"))
    >>> problem.loss(0).backward()
    >>> problem.model.weight.grad.shape
    torch.Size([1, 50])
    >>> problem.metric()  # the trained weights are still w = 0, at distance 1 from w*
    1.0

References:
    Hochreiter, Schmidhuber. Long short-term memory. Neural Computation 1997.
    Pascanu, Mikolov, Bengio. On the difficulty of training recurrent neural networks.
    ICML 2013. Zhang, Karimireddy, Veit, Kim, Reddi, Kumar, Sra. Why are adaptive methods
    good for attention models? NeurIPS 2020. Wang et al. AdaGC, arXiv 2502.11034.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from gradclip.demo.muon import MuonAdamW, MuonConfig, MuonProblem
from gradclip.demo.real_problems import PROBLEMS as REAL_PROBLEMS
from gradclip.demo.real_problems import DigitsConfig, TextConfig

__all__ = [
    "AdditionConfig",
    "HeavyTailConfig",
    "LabelNoiseConfig",
    "MuonAdamW",
    "MuonConfig",
    "Problem",
    "SpikesConfig",
    "TaskConfig",
    "as_passed",
    "build_problem",
    "optimizer_of",
]


class Problem(Protocol):
    """One instantiated task: model, optimizer, data stream and metric."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | MuonAdamW  # MuonAdamW: Muon and AdamW, stepped as one

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


class _Regression:
    """Linear regression from w = 0 towards a unit w* fixed by ``cfg.data_seed``, with SGD;
    the metric is ``||w - w*||`` averaged over the last ``cfg.window`` of the run (the
    heavy-tail and label-noise tasks)."""

    def __init__(self, cfg: HeavyTailConfig | LabelNoiseConfig, seed: int, steps: int,
                 device: torch.device, momentum: float = 0.0):
        self.cfg, self.device = cfg, device
        w_star = torch.randn(cfg.dim, generator=torch.Generator().manual_seed(cfg.data_seed))
        self.w_star = (w_star / w_star.norm()).to(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.model = nn.utils.skip_init(nn.Linear, cfg.dim, 1, bias=False).to(device)
        with torch.no_grad():
            self.model.weight.zero_()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=momentum)
        self.start = steps - max(1, round(cfg.window * steps))
        self.distances: list[float] = []

    def after_step(self, step: int) -> None:
        if step >= self.start:
            with torch.no_grad():
                self.distances.append((self.model.weight[0] - self.w_star).norm().item())

    def metric(self) -> float:
        if not self.distances:  # stopped before the window: measure the final weights
            with torch.no_grad():
                return (self.model.weight[0] - self.w_star).norm().item()
        return math.fsum(self.distances) / len(self.distances)


class _HeavyTailProblem(_Regression):
    def __init__(self, cfg: HeavyTailConfig, seed: int, steps: int, device: torch.device):
        super().__init__(cfg, seed, steps, device)
        noise = _student_t(cfg.df, steps * cfg.batch, self.gen).view(steps, cfg.batch)
        self.noise = noise.to(device)

    def loss(self, step: int) -> Tensor:
        x = torch.randn(self.cfg.batch, self.cfg.dim, generator=self.gen).to(self.device)
        y = x @ self.w_star + self.noise[step]
        return 0.5 * nn.functional.mse_loss(self.model(x).squeeze(-1), y)


# ---------------------------------------------------------------------------------------
# sgd-label-noise


@dataclass(frozen=True)
class LabelNoiseConfig:
    """Linear regression with SGD and momentum; a few late batches have corrupted labels.

    ``x ~ N(0, I_dim)``, ``||w*|| = 1`` (so w = 0 scores 1.0), ``y = x . w* + noise`` with
    Gaussian label noise of standard deviation ``noise``, loss ``mean((x.w - y)^2) / 2``,
    SGD with momentum from w = 0. The batches at ``corrupt_at`` (fractions of the run's
    steps, late in it) carry ``corrupt_scale`` times the label noise (x1000). The metric is
    ``||w - w*||`` averaged over the last ``window`` of the run (as for
    :class:`HeavyTailConfig`), so that the damage a corrupted batch does counts for as long
    as it lasts.

    Attributes:
        lr: SGD learning rate (momentum ``momentum``).
        noise: standard deviation of the label noise of a clean batch.
        corrupt_at: positions of the corrupted batches, as fractions of the step count.
        corrupt_scale: factor applied to the label noise of a corrupted batch.
        momentum: SGD momentum.
        dim: number of features.
        batch: training batch size.
        window: fraction of the run, at its end, over which ``||w - w*||`` is averaged.
        data_seed: seed of w* (the same for every run seed).
    """

    lr: float = 0.01
    noise: float = 1e-3
    corrupt_at: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.98)
    corrupt_scale: float = 1000.0
    momentum: float = 0.9
    dim: int = 50
    batch: int = 32
    window: float = 0.125
    data_seed: int = 4_000_003


class _LabelNoiseProblem(_Regression):
    def __init__(self, cfg: LabelNoiseConfig, seed: int, steps: int, device: torch.device):
        super().__init__(cfg, seed, steps, device, momentum=cfg.momentum)
        self.corrupted = {round(f * steps) for f in cfg.corrupt_at}

    def loss(self, step: int) -> Tensor:
        x = torch.randn(self.cfg.batch, self.cfg.dim, generator=self.gen).to(self.device)
        noise = self.cfg.noise * torch.randn(self.cfg.batch, generator=self.gen)
        if step in self.corrupted:
            noise = noise * self.cfg.corrupt_scale
        y = x @ self.w_star + noise.to(self.device)
        return 0.5 * nn.functional.mse_loss(self.model(x).squeeze(-1), y)


TaskConfig = (
    AdditionConfig | SpikesConfig | HeavyTailConfig | MuonConfig | LabelNoiseConfig | TextConfig
    | DigitsConfig
)
"""The hyperparameters of a task; their type selects the problem (the real-data ones live in
:mod:`gradclip.demo.real_problems`)."""
"""The hyperparameters of a task; their type selects the problem."""

_PROBLEMS: dict[type, Callable[[TaskConfig, int, int, torch.device], Problem]] = {
    AdditionConfig: _AdditionProblem,
    SpikesConfig: _SpikesProblem,
    HeavyTailConfig: _HeavyTailProblem,
    MuonConfig: MuonProblem,
    LabelNoiseConfig: _LabelNoiseProblem,
    **REAL_PROBLEMS,
}


def as_passed(
    optimizer: torch.optim.Optimizer | MuonAdamW,
) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """A problem's optimizer as a user passes it to gradclip: :class:`MuonAdamW` as its two,
    ``[muon, adamw]`` (the finder and the recommendation read each one's kind).

    Example:
        >>> w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
        >>> muon, adamw = torch.optim.Muon([w]), torch.optim.AdamW([b])
        >>> as_passed(MuonAdamW(muon, adamw)) == [muon, adamw], as_passed(adamw) is adamw
        (True, True)
    """
    return list(optimizer.optimizers) if isinstance(optimizer, MuonAdamW) else optimizer


def optimizer_of(config: TaskConfig) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The optimizer a task of ``config`` trains with, as a user passes it to gradclip
    (:func:`as_passed`), on a throw-away one-step problem: for what reads only its kind, such
    as ``AdaptiveClip(optimizer=...)``'s rule or the recommendation's.

    Example:
        >>> type(optimizer_of(SpikesConfig())).__name__
        'Adam'
    """
    return as_passed(build_problem(config, 0, 1, torch.device("cpu")).optimizer)


def build_problem(config: TaskConfig, seed: int, steps: int, device: torch.device) -> Problem:
    """A fresh problem of ``config``'s kind: model, optimizer and data for a run of ``steps``.

    Args:
        config: an :class:`AdditionConfig`, :class:`SpikesConfig`, :class:`HeavyTailConfig`,
            :class:`MuonConfig`, :class:`LabelNoiseConfig`, or a real-data config
            (:mod:`gradclip.demo.real_problems`).
        seed: seeds the initialisation and the training batches (the validation / test
            data and the teacher come from ``config.data_seed``).
        steps: the run's length (the glitches and the metric's window are placed in it).
        device: where the model and its data live; the data is generated on the CPU and
            moved, so a seed means the same data on every device.

    Raises:
        TypeError: ``config`` is not one of the config types.
    """
    if type(config) not in _PROBLEMS:
        raise TypeError(
            "`config` must be a task config: TextConfig, DigitsConfig, AdditionConfig, "
            f"SpikesConfig, HeavyTailConfig, MuonConfig or LabelNoiseConfig, got {type(config).__name__}"
        )
    return _PROBLEMS[type(config)](config, seed, steps, device)
