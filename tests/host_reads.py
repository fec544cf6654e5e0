"""One detector of host reads, shared by every test that checks the step path is sync-free.

A step on an accelerator must never hand a device value to Python: that blocks the host
until the device catches up. The tests run the accelerator code path on CPU tensors (with
``gradclip._foreach.is_host_device`` patched to return False) under this detector.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReadDetector"]

HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,  # returns a Python bool
}


UNDISPATCHED_READS = ("tolist", "numpy")  # copy to the host without an aten op

# A tensor built from Python data (``torch.tensor(list)``): on an accelerator, a synchronous
# host-to-device copy, which a captured CUDA graph cannot contain.
HOST_COPIES = {torch.ops.aten.lift_fresh.default}


class HostReadDetector(TorchDispatchMode):
    """Records every op that hands a tensor's value to Python (``reads``), and every tensor
    built from Python data (``copies``: a host-to-device copy on an accelerator).

    Dispatched reads are caught by the mode; ``Tensor.tolist`` and ``Tensor.numpy`` never
    reach the dispatcher, so they are wrapped for the duration of the mode.
    """

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.copies: list[str] = []
        self._originals: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        elif func in HOST_COPIES:
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in UNDISPATCHED_READS:
            original = self._originals[name] = getattr(torch.Tensor, name)

            def recording(tensor, *args, _name=name, _original=original, **kwargs):
                self.reads.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, recording)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)
