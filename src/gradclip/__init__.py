"""gradclip: gradient clipping for PyTorch, done properly.

A faster, safer drop-in for ``torch.nn.utils``' clipping functions, built on one pass that
measures every gradient once (:func:`grad_norms`).

Example:
    >>> import torch, gradclip
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> total = gradclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
"""

from gradclip.clippers import (
    AGC,
    AdaGC,
    AdaGCState,
    AdaptiveClip,
    AdaptiveClipState,
    AutoClip,
    AutoClipState,
    Clipper,
    GradientSpikeError,
    NormClip,
    SpikeDetector,
    SpikeLayer,
    SpikeReport,
    SpikeState,
    Step,
    UpdateClip,
    UpdateClipState,
    ValueClip,
    ZClip,
    ZClipState,
)
from gradclip.functional import (
    NotATensorError,
    clip_grad_norm,
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_norms,
)
from gradclip.history import History, MonitorSummary
from gradclip.monitor import GradMonitor
from gradclip.nonfinite import NonFiniteGradientError
from gradclip.norms import GradNorms
from gradclip.paramgroups import muon_like
from gradclip.readlog import read_log
from gradclip.recommend import Recommendation, recommend_max_norm
from gradclip.sinks import CSVSink, JSONLSink, LogError, Sink, TensorBoardSink
from gradclip.stats import ClipStats, GroupStats
from gradclip.tune import MaxNormSearch, find_max_norm

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AdaGC",
    "AdaGCState",
    "AdaptiveClip",
    "AdaptiveClipState",
    "AutoClip",
    "AutoClipState",
    "CSVSink",
    "ClipStats",
    "Clipper",
    "GradMonitor",
    "GradNorms",
    "GradientSpikeError",
    "GroupStats",
    "History",
    "JSONLSink",
    "LogError",
    "MaxNormSearch",
    "MonitorSummary",
    "NonFiniteGradientError",
    "NormClip",
    "NotATensorError",
    "Recommendation",
    "Sink",
    "SpikeDetector",
    "SpikeLayer",
    "SpikeReport",
    "SpikeState",
    "Step",
    "TensorBoardSink",
    "UpdateClip",
    "UpdateClipState",
    "ValueClip",
    "ZClip",
    "ZClipState",
    "__version__",
    "clip_grad_norm",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "find_max_norm",
    "get_total_norm",
    "grad_norms",
    "muon_like",
    "read_log",
    "recommend_max_norm",
]
