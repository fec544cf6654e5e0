"""Embedded problems on real data that ships with Python or a PyPI package: nothing downloads.

* :class:`TextConfig`: character-level language modelling of English text: the Python
  documentation's topic pages (``pydoc_data.topics``, part of the standard library, about
  465,000 characters). Two models: a small causal transformer (``model="transformer"``,
  AdamW with linear warm-up and cosine decay, as LLM recipes train) and an LSTM
  (``model="lstm"``, plain SGD at a high learning rate, as the classic LSTM language models
  of Zaremba et al. 2014 and Merity et al. 2018 train, with clipping). Metric: the mean
  cross-entropy (nats per character) on held-out text.
* :class:`DigitsConfig`: a small convolutional classifier on the 8x8 handwritten digits of
  the UCI repository (1,797 images, bundled with scikit-learn as ``load_digits``). Metric:
  the cross-entropy on a held-out quarter of the images.

The data is the same for every run seed (``data_seed`` fixes the split); the seed draws the
initialisation and the batches from a local generator, as in :mod:`gradclip.demo.problems`.

Example:
    >>> import torch
    >>> from gradclip.demo.real_problems import TextConfig, TextProblem
    >>> problem = TextProblem(TextConfig(model="lstm"), seed=0, steps=10, device=torch.device("cpu"))
    >>> problem.loss(0).backward()
    >>> 3.5 < problem.metric() < 5.0   # untrained: about log(vocabulary size)
    True

References:
    Zaremba, Sutskever, Vinyals. Recurrent neural network regularization. arXiv:1409.2329,
    2014. Merity, Keskar, Socher. Regularizing and optimizing LSTM language models. ICLR
    2018. Radford et al. Language models are unsupervised multitask learners (GPT-2), 2019.
    Alpaydin, Kaynak. Optical recognition of handwritten digits. UCI, 1998.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PROBLEMS", "DigitsConfig", "DigitsProblem", "TextConfig", "TextProblem", "corpus"]


def _seeded(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Re-initialise ``module``'s weights from ``gen`` (torch's own init reads the global RNG):
    matrices uniform in +-1/sqrt(fan_in), vectors (biases, norms' shifts) zero, norms' scales one."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                bound = 1.0 / math.sqrt(p.shape[1] if p.dim() == 2 else p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):  # LayerNorm scale
                p.fill_(1.0)
            else:
                p.zero_()
    return module


# ---------------------------------------------------------------------------------------
# text: the Python documentation's topics


@functools.cache
def corpus() -> tuple[Tensor, str]:
    """The text as character ids (int64) and its alphabet; ids index the alphabet.

    Printable ASCII and newlines are kept; any other character becomes ``"?"``. Raises
    ImportError if this Python lacks ``pydoc_data`` (some distributions split it off).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - present in CPython's standard library
        raise ImportError(
            "the text tasks read the Python documentation from the standard library module "
            "pydoc_data, which this Python lacks (e.g. Debian ships it in python3-doc)"
        ) from exc
    text = "\n\n".join(topics[key] for key in sorted(topics))
    text = "".join(ch if ch == "\n" or 32 <= ord(ch) < 127 else "?" for ch in text)
    alphabet = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(alphabet)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    return ids, alphabet


@dataclass(frozen=True)
class TextConfig:
    """Character-level language modelling of the Python docs (see the module doc).

    Attributes:
        model: ``"transformer"`` (pre-norm causal transformer) or ``"lstm"``.
        lr: peak learning rate (AdamW for the transformer, SGD for the LSTM).
        width: embedding / hidden width.
        layers: transformer blocks or LSTM layers.
        context: characters per training sequence.
        batch: sequences per batch.
        warmup: fraction of the run spent in linear warm-up (transformer only; then cosine
            decay to ``min_lr`` x lr).
        min_lr: the cosine schedule's floor, as a fraction of ``lr``.
        weight_decay: AdamW's decoupled weight decay (transformer only).
        val_sequences: held-out sequences scored by the metric.
        holdout: the final fraction of the text kept for validation.
        data_seed: seed of the validation sequences.
    """

    model: Literal["transformer", "lstm"] = "transformer"
    lr: float = 3e-3
    width: int = 48
    layers: int = 2
    context: int = 32
    batch: int = 16
    warmup: float = 0.1
    min_lr: float = 0.1
    weight_decay: float = 0.1
    val_sequences: int = 256
    holdout: float = 0.1
    data_seed: int = 4_000_003


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)  # fmt: skip
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class _Transformer(nn.Module):
    def __init__(self, vocab: int, cfg: TextConfig, gen: torch.Generator):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width)
        self.position = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg.width, 4) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, vocab)
        _seeded(self, gen)
        with torch.no_grad():  # GPT-2's initialisation scales
            self.embed.weight.normal_(0.0, 0.02, generator=gen)
            self.position.normal_(0.0, 0.01, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class _LSTM(nn.Module):
    def __init__(self, vocab: int, cfg: TextConfig, gen: torch.Generator):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.width)
        self.lstm = nn.LSTM(cfg.width, cfg.width, cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.width, vocab)
        with torch.no_grad():  # Zaremba et al.: every weight uniform in +-0.1
            for p in self.parameters():
                p.uniform_(-0.1, 0.1, generator=gen)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)


def _warmup_cosine(steps: int, warmup: float, floor: float):
    ramp = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = min(1.0, (step - ramp) / max(1, steps - ramp))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class TextProblem:
    """A :class:`TextConfig` instantiated: model, optimizer (and schedule), batches, metric."""

    def __init__(self, cfg: TextConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        ids, alphabet = corpus()
        split = round(len(ids) * (1 - cfg.holdout))
        self.train, val = ids[:split], ids[split:]
        val_gen = torch.Generator().manual_seed(cfg.data_seed)
        starts = torch.randint(0, len(val) - cfg.context - 1, (cfg.val_sequences,), generator=val_gen)
        self.val = torch.stack([val[s : s + cfg.context + 1] for s in starts.tolist()]).to(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        with torch.random.fork_rng(devices=[]):  # torch's own init draws from the global RNG
            model: nn.Module = (_Transformer if cfg.model == "transformer" else _LSTM)(
                len(alphabet), cfg, self.gen
            )
        self.model = model.to(device)
        if cfg.model == "transformer":
            decay = [p for p in self.model.parameters() if p.dim() >= 2]
            rest = [p for p in self.model.parameters() if p.dim() < 2]
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay},
                 {"params": rest, "weight_decay": 0.0}],
                lr=cfg.lr, betas=(0.9, 0.95),
            )  # fmt: skip
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, _warmup_cosine(steps, cfg.warmup, cfg.min_lr)
            )
        else:
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)

    def _cross_entropy(self, window: Tensor) -> Tensor:
        logits = self.model(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))

    def loss(self, step: int) -> Tensor:
        cfg = self.cfg
        starts = torch.randint(0, len(self.train) - cfg.context - 1, (cfg.batch,), generator=self.gen)
        window = torch.stack([self.train[s : s + cfg.context + 1] for s in starts.tolist()])
        return self._cross_entropy(window.to(self.device))

    def after_step(self, step: int) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def metric(self) -> float:
        with torch.no_grad():
            return self._cross_entropy(self.val).item()


# ---------------------------------------------------------------------------------------
# digits: scikit-learn's copy of the UCI handwritten digits


@dataclass(frozen=True)
class DigitsConfig:
    """A small CNN on 8x8 handwritten digits (see the module doc).

    Attributes:
        optimizer: ``"sgd"`` (momentum 0.9, constant rate) or ``"adamw"`` (warm-up then
            cosine decay, as :class:`TextConfig`'s transformer).
        lr: (peak) learning rate.
        channels: channels of the two 3x3 convolutions.
        batch: images per batch.
        warmup, min_lr: the AdamW schedule (see :class:`TextConfig`).
        test_fraction: share of the images held out for the metric.
        data_seed: seed of the train / test split.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    channels: tuple[int, int] = (16, 32)
    batch: int = 32
    warmup: float = 0.1
    min_lr: float = 0.1
    test_fraction: float = 0.25
    data_seed: int = 5_000_003


@functools.cache
def _digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits task reads the handwritten digits bundled with scikit-learn: "
            "pip install scikit-learn"
        ) from exc
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsProblem:
    """A :class:`DigitsConfig` instantiated: model, optimizer (and schedule), batches, metric."""

    def __init__(self, cfg: DigitsConfig, seed: int, steps: int, device: torch.device):
        self.cfg, self.device = cfg, device
        images, labels = _digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.data_seed))
        n_test = round(cfg.test_fraction * len(labels))
        test, train = order[:n_test], order[n_test:]
        self.train_x, self.train_y = images[train], labels[train]
        self.test_x, self.test_y = images[test].to(device), labels[test].to(device)
        self.gen = torch.Generator().manual_seed(seed)
        c1, c2 = cfg.channels
        with torch.random.fork_rng(devices=[]):  # torch's own init draws from the global RNG
            model = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
                nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(c2 * 16, 10),
            )  # fmt: skip
        self.model = _seeded(model, self.gen).to(device)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.model.parameters(), lr=cfg.lr, momentum=0.9
            )
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                               betas=(0.9, 0.95), weight_decay=0.1)  # fmt: skip
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, _warmup_cosine(steps, cfg.warmup, cfg.min_lr)
            )

    def loss(self, step: int) -> Tensor:
        pick = torch.randint(0, len(self.train_y), (self.cfg.batch,), generator=self.gen)
        x, y = self.train_x[pick].to(self.device), self.train_y[pick].to(self.device)
        return F.cross_entropy(self.model(x), y)

    def after_step(self, step: int) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def metric(self) -> float:
        with torch.no_grad():
            return F.cross_entropy(self.model(self.test_x), self.test_y).item()


PROBLEMS = {TextConfig: TextProblem, DigitsConfig: DigitsProblem}
"""Config type -> problem class, for :func:`gradclip.demo.problems.build_problem`."""
