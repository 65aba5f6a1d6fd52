"""A virtual CUDA device for tests on a machine without a GPU.

slice2vol's CUDA path has to keep every tensor on one device, never hand a device tensor to numpy
or a numba kernel, and never draw device random numbers from a CPU generator.  Without a GPU
nothing exercises that, so :func:`virtual_cuda` fakes one: tensors that would live on CUDA are
ordinary CPU tensors carrying a ``_vcuda`` mark, and a :class:`~torch.overrides.TorchFunctionMode`

* makes ``t.device`` / ``t.is_cuda`` of a marked tensor say ``cuda:0`` (so every device dispatch
  in the code under test takes its CUDA branch), rewrites ``device="cuda"`` factories, ``.to``,
  ``.cuda``, ``.cpu``, ``nn.Module.to`` and ``torch.load(map_location="cuda")``, and passes the
  mark from inputs to outputs;
* records (:class:`Record`) where real CUDA would refuse: an op mixing marked and non-scalar
  unmarked tensors (or numpy arrays), an unmarked tensor indexed by a marked index or written with
  a value of the other kind, ``.numpy()`` / ``np.asarray`` of a marked tensor (which is also how a
  numba kernel would receive device data), a CPU generator for a marked random draw.

``torch.cuda.is_available`` and the memory / synchronisation functions are faked for the duration.
It cannot see CUDA numerics (TF32, atomics), memory limits or missing kernels, and autograd's
backward runs unobserved.  Written after a review of the CUDA path (2026-12-06) that found no
device error; ``tests/test_virtual_cuda.py`` keeps it that way.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)


def is_v(t) -> bool:
    """Whether ``t`` is a tensor that lives on the virtual CUDA device."""
    return isinstance(t, torch.Tensor) and t.__dict__.get("_vcuda", False)


def _tag(out, value=True):
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                if value:
                    t._vcuda = True
                elif "_vcuda" in t.__dict__:
                    del t._vcuda
            except Exception:  # some tensors (e.g. views of parameters under no_grad) refuse attributes
                pass
    return out


def _wants_cuda(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int):
        return True
    try:
        return torch.device(dev).type == "cuda"
    except Exception:
        return False


def _tensors(args, kwargs) -> list:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


@dataclass
class Record:
    """What a :func:`virtual_cuda` block saw: ``violations`` (one entry per kind and code line, with
    a count) and ``calls`` (torch functions intercepted)."""

    violations: dict = field(default_factory=dict)
    calls: int = 0

    def add(self, kind: str, func, detail: str = "") -> None:
        frames = traceback.extract_stack()[:-2]
        ours = [f for f in frames if os.sep + "slice2vol" + os.sep in f.filename] or frames
        f = ours[-1]
        key = (kind, f.filename, f.lineno)
        v = self.violations.setdefault(key, {"kind": kind, "where": f"{f.filename}:{f.lineno}", "code": (f.line or "").strip(),
                                             "func": getattr(func, "__name__", str(func)), "detail": detail, "count": 0})
        v["count"] += 1

    def report(self) -> str:
        return "\n".join(f"[{v['kind']}] {v['where']} x{v['count']}: {v['code']} ({v['func']}; {v['detail']})"
                         for v in self.violations.values()) or "no violations"


_DEVICE_FREE = {"view_as", "expand_as", "reshape_as", "size", "dim", "numel", "__format__", "__repr__", "__len__",
                "is_floating_point", "is_complex", "element_size", "stride", "storage_offset", "is_contiguous",
                "data_ptr", "untyped_storage", "_is_view", "__reduce_ex__", "__deepcopy__", "requires_grad_",
                "retain_grad", "register_hook", "backward", "copy_", "set_", "__hash__"}

_RANDOM = {"rand", "randn", "randint", "randperm", "multinomial", "normal", "bernoulli", "rand_like", "randn_like",
           "randint_like", "uniform_", "normal_", "random_", "exponential_", "poisson"}


class _Mode(TorchFunctionMode):
    """The function mode behind :func:`virtual_cuda` (see the module docstring)."""

    def __init__(self, record: "Record"):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        self.record.calls += 1
        # ---------------------------------------------------------------- attribute getters / setters
        if name in ("__get__", "__set__") and hasattr(func, "__self__") and not isinstance(func.__self__, torch.Tensor):
            attr = getattr(func.__self__, "__name__", "")
            owner = args[0] if args else None
            if name == "__get__":
                if attr == "device":
                    return CUDA if is_v(owner) else func(*args, **kwargs)
                if attr == "is_cuda":
                    return True if is_v(owner) else func(*args, **kwargs)
                if attr == "is_cpu":
                    return False if is_v(owner) else func(*args, **kwargs)
                r = func(*args, **kwargs)
                if isinstance(r, torch.Tensor) and is_v(owner) and r is not owner:
                    _tag(r)
                return r
            r = func(*args, **kwargs)
            if attr == "data" and len(args) >= 2:
                _tag(owner, is_v(args[1]))
            return r
        # ---------------------------------------------------------------- numpy
        if name in ("numpy", "__array__"):
            if args and is_v(args[0]):
                self.record.add("numpy() of a CUDA tensor", func, f"shape {tuple(args[0].shape)}")
            return func(*args, **kwargs)
        # ---------------------------------------------------------------- device moves
        if name in ("to", "cuda", "cpu", "type_as") and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            if name == "cpu":
                r = func(*args, **kwargs)
                if r is t and is_v(t):
                    r = t.view_as(t)
                return _tag(r, False)
            if name == "cuda":
                r = t.view_as(t)
                return _tag(r)
            if name == "type_as":
                r = func(*args, **kwargs)
                if r is t and is_v(t) != is_v(args[1]):
                    r = t.view_as(t)
                return _tag(r, is_v(args[1]))
            # .to
            rest = list(args[1:])
            copy = kwargs.pop("copy", False)
            target_v = None
            if rest and isinstance(rest[0], torch.Tensor):
                target_v = is_v(rest[0])
                r = t.to(rest[0].dtype)
            else:
                dev, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
                if dev is not None:
                    target_v = _wants_cuda(dev)
                kw = {}
                if dtype is not None:
                    kw["dtype"] = dtype
                if memory_format is not None:
                    kw["memory_format"] = memory_format
                r = t.to(copy=copy, **kw) if (kw or copy) else t
            if target_v is None:
                target_v = is_v(t)
            if r is t and is_v(t) != target_v:
                r = t.view_as(t)
                if isinstance(t, torch.nn.Parameter) and target_v:
                    _tag(t)  # nn.Module.to: the parameter's .data is replaced in place
            return _tag(r, target_v)
        # ---------------------------------------------------------------- factories with device=
        if "device" in kwargs:
            want = _wants_cuda(kwargs["device"])
            if want:
                kwargs["device"] = "cpu"
            gen = kwargs.get("generator")
            if want and gen is not None and gen.device.type == "cpu" and name in _RANDOM:
                self.record.add("CPU generator used for a CUDA random draw", func)
            r = func(*args, **kwargs)
            return _tag(r, want) if want else _tag(r, False)
        tens = _tensors(args, kwargs)
        tagged = [t for t in tens if is_v(t)]
        # ---------------------------------------------------------------- random draws on tagged tensors
        gen = kwargs.get("generator")
        if tagged and gen is not None and gen.device.type == "cpu" and name in _RANDOM:
            self.record.add("CPU generator used for a CUDA random draw", func)
        # ---------------------------------------------------------------- new_* methods (device of self)
        if name.startswith("new_") and args and isinstance(args[0], torch.Tensor):
            r = func(*args, **kwargs)
            return _tag(r, is_v(args[0]))
        if name in _DEVICE_FREE:
            r = func(*args, **kwargs)
            if name in ("view_as", "expand_as", "reshape_as") and is_v(args[0]):
                _tag(r)
            return r
        # ---------------------------------------------------------------- indexing
        if name == "__getitem__":
            self_t, idx = args[0], args[1]
            idx_t = [t for t in tree_flatten(idx)[0] if isinstance(t, torch.Tensor)]
            if not is_v(self_t) and any(is_v(t) for t in idx_t):
                self.record.add("CPU tensor indexed with a CUDA index", func, f"self {tuple(self_t.shape)}")
            r = func(*args, **kwargs)
            return _tag(r, is_v(self_t))
        if name == "__setitem__":
            self_t, idx, val = args[0], args[1], args[2]
            idx_t = [t for t in tree_flatten(idx)[0] if isinstance(t, torch.Tensor)]
            advanced = bool(idx_t)
            if not is_v(self_t) and any(is_v(t) for t in idx_t):
                self.record.add("CPU tensor indexed with a CUDA index (setitem)", func)
            if isinstance(val, torch.Tensor) and val.dim() > 0 and is_v(val) != is_v(self_t) and advanced:
                self.record.add("index_put_ value on another device", func,
                          f"self {'cuda' if is_v(self_t) else 'cpu'}, value {'cuda' if is_v(val) else 'cpu'}")
            return func(*args, **kwargs)
        # ---------------------------------------------------------------- general ops
        if tagged:
            arrs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, np.ndarray) and a.ndim > 0]
            if arrs:
                self.record.add("numpy array combined with a CUDA tensor", func, f"array shapes {[a.shape for a in arrs][:3]}")
            cpu_nonscalar = [t for t in tens if not is_v(t) and t.dim() > 0]
            if cpu_nonscalar:
                self.record.add("mixed CUDA / CPU tensors in one op", func,
                          f"cpu shapes {[tuple(t.shape) for t in cpu_nonscalar][:3]}, cuda shapes "
                          f"{[tuple(t.shape) for t in tagged][:3]}")
        r = func(*args, **kwargs)
        if tagged:
            outs = [t for t in tree_flatten(r)[0] if isinstance(t, torch.Tensor)]
            for o in outs:
                if not is_v(o) and not any(o is t for t in tens if not is_v(t)):
                    _tag(o)
        return r


@contextlib.contextmanager
def virtual_cuda():
    """Run the block with a virtual CUDA device; yields the :class:`Record` it fills.

    Everything patched (``torch.cuda``'s availability, synchronisation and memory functions,
    ``torch.load``, ``nn.Parameter.__new__``, cuDNN's TF32 flag) is restored on exit.
    """
    record = Record()
    orig_new, orig_load = torch.nn.Parameter.__new__, torch.load

    def param_new(cls, data=None, requires_grad=True):
        p = orig_new(cls, data, requires_grad)
        if data is not None and is_v(data):
            p._vcuda = True
        return p

    def load(*a, map_location=None, **k):
        want = isinstance(map_location, (str, torch.device, int)) and _wants_cuda(map_location)
        r = orig_load(*a, map_location="cpu" if want else map_location, **k)
        return _tag(r) if want else r

    fakes = {"is_available": lambda: True, "synchronize": lambda *a, **k: None,
             "mem_get_info": lambda *a, **k: (80 * 2**30, 80 * 2**30), "reset_peak_memory_stats": lambda *a, **k: None,
             "max_memory_allocated": lambda *a, **k: 0, "get_device_name": lambda *a, **k: "virtual CUDA",
             "device_count": lambda: 1}
    saved = {k: getattr(torch.cuda, k) for k in fakes}
    tf32 = torch.backends.cudnn.allow_tf32
    try:
        for k, f in fakes.items():
            setattr(torch.cuda, k, f)
        torch.nn.Parameter.__new__ = param_new
        torch.load = load
        with _Mode(record):
            yield record
    finally:
        for k, f in saved.items():
            setattr(torch.cuda, k, f)
        torch.nn.Parameter.__new__ = orig_new
        torch.load = orig_load
        torch.backends.cudnn.allow_tf32 = tf32
