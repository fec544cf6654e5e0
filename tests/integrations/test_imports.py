"""`import gradclip` imports no framework; an integration without its framework says what to
install."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def test_import_gradclip_imports_no_framework() -> None:
    code = (
        "import sys, gradclip, gradclip.integrations\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})\n"
        "print(loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("gradclip.integrations.lightning", ("lightning", "pytorch_lightning"), "lightning"),
        ("gradclip.integrations.huggingface", ("transformers",), "huggingface"),
    ],
)
def test_integration_without_its_framework_names_the_pip_command(
    module: str, missing: tuple[str, ...], extra: str, monkeypatch
) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in missing or name == module:
            monkeypatch.delitem(sys.modules, name)
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    with pytest.raises(ModuleNotFoundError, match=rf"pip install 'gradclip\[{extra}\]'"):
        importlib.import_module(module)


def test_a_broken_framework_install_is_not_hidden(monkeypatch) -> None:
    """A framework that is there but lacks one of its own dependencies shows that error."""
    import gradclip.integrations._common as common

    def broken(name: str):
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml")

    monkeypatch.setattr(common.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="yaml") as info:
        common.require(("lightning.pytorch",), "lightning", "x")
    assert "pip install 'gradclip" not in str(info.value)
