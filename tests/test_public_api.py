"""The public surface, pinned: what ``import gradclip`` offers, and every module's ``__all__``.

A name leaves or joins the public API only by changing this file. Inside the package, a
module imports from another module only names that module exports (its ``__all__``), so
that ``__all__`` says truthfully what each module offers to the rest.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import gradclip

PUBLIC = {
    # the drop-ins of torch.nn.utils, and the one pass they share
    "clip_grad_norm", "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_",
    "get_total_norm", "grad_norms", "GradNorms", "NotATensorError",
    # clippers, their typed state, the step they return
    "Clipper", "Step", "NormClip", "ValueClip", "AutoClip", "AutoClipState", "ZClip",
    "ZClipState", "AGC", "AdaGC", "AdaGCState", "AdaptiveClip", "AdaptiveClipState",
    "ClipStats", "NonFiniteGradientError",
    # clipping by parameter group, and the optimizer's update
    "GroupStats", "muon_like", "UpdateClip", "UpdateClipState",
    # gradient spikes: detect, then skip, clip or stop; what went wrong
    "SpikeDetector", "SpikeState", "SpikeReport", "SpikeLayer", "GradientSpikeError",
    # seeing what clipping does
    "GradMonitor", "History", "MonitorSummary", "read_log", "Recommendation",
    "recommend_max_norm", "Sink", "JSONLSink", "CSVSink", "TensorBoardSink", "LogError",
    # finding max_norm on your own model
    "find_max_norm", "MaxNormSearch",
    "__version__",
}

SRC = Path(gradclip.__file__).parent


def _modules() -> list[str]:
    names = ["gradclip"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="gradclip."):
        if not info.name.endswith("__main__"):  # runs the command line when imported
            names.append(info.name)
    return sorted(names)


def test_top_level_surface_is_pinned() -> None:
    assert set(gradclip.__all__) == PUBLIC
    for name in gradclip.__all__:
        assert getattr(gradclip, name) is not None, name


@pytest.mark.parametrize("name", _modules())
def test_every_module_declares_what_it_exports(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def _imports_from_gradclip() -> list[tuple[str, str, str]]:
    """``(importing file, module, name)`` for every ``from gradclip.x import name``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").split(".")[0] == "gradclip"
            ):
                found.extend((str(path.relative_to(SRC)), node.module, a.name) for a in node.names)
    return found


def test_modules_import_only_exported_names() -> None:
    wrong = []
    for where, module_name, name in _imports_from_gradclip():
        module = importlib.import_module(module_name)
        if hasattr(module, "__path__") and importlib.util.find_spec(f"{module_name}.{name}"):
            continue  # a submodule of a package
        if name not in getattr(module, "__all__", ()):
            wrong.append(f"{where}: from {module_name} import {name}")
    assert not wrong, "imports of names a module does not export:\n" + "\n".join(wrong)
