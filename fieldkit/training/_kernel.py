"""The fused CPU weight delta (``_delta.c``), built on first use and loaded with ctypes.

The C source is compiled once per machine with the system compiler (``$CC``, else Python's,
else ``cc``) into a cache folder (``$FIELDKIT_CACHE/fieldkit``, else
``$XDG_CACHE_HOME/fieldkit``, else ``~/.cache/fieldkit``) under a name
that hashes the source, the command and the machine, written atomically so that ranks starting
together don't collide. Where it can't be built (no compiler, a read-only home, Windows),
:func:`library` is ``None``, :func:`status` says why (also once as a ``UserWarning`` and at
INFO to the ``fieldkit`` logger) and :func:`~fieldkit.training.weight_delta` uses torch ops instead
(figures equal to within float32 rounding, about twice as slow). ``FIELDKIT_NO_KERNEL=1``
turns the kernel off.

It takes pairs of contiguous CPU tensors of one dtype, float32 or bfloat16; everything else
(CUDA, float16, float64, mixed dtypes, strided views) goes the torch way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_delta.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
PER_THREAD = 1 << 20
"""Elements per thread: fewer threads for a small adapter, where starting one costs more."""

_log = logging.getLogger("fieldkit")
_why = "not built yet"


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or ``None`` when it is turned off or can't be built."""
    return None if _turned_off() else _build()


def status() -> str:
    """Which path :func:`~fieldkit.training.weight_delta` takes on the CPU, and why."""
    if _turned_off():
        return "torch ops (FIELDKIT_NO_KERNEL is set)"
    lib = _build()
    return f"fused C kernel ({lib._name})" if lib is not None else f"torch ops ({_why})"


def compiler() -> list[str]:
    """The C compiler command: ``$CC``, else the one Python was built with, else ``cc``."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _turned_off() -> bool:
    return os.environ.get("FIELDKIT_NO_KERNEL", "") not in ("", "0")


@functools.cache
def _build() -> ctypes.CDLL | None:
    global _why
    command = [*compiler(), *FLAGS]
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((command, platform.machine(), platform.system())).encode()
    ).hexdigest()[:16]
    try:
        target = _cache_dir() / f"delta-{key}.so"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                done = subprocess.run(
                    [*command, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120
                )
                if done.returncode != 0:
                    raise OSError(f"{shlex.join(command)} failed: {done.stderr.strip()[-500:]}")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:  # RuntimeError: no home
        _why = f"the C kernel could not be built: {err}"
        _log.info("fieldkit: weight_delta uses torch ops on the CPU; %s", _why)
        warnings.warn(
            f"fieldkit: weight_delta uses torch ops on the CPU (same figures, about twice as "
            f"slow): {_why}. Set FIELDKIT_NO_KERNEL=1 to choose that path and silence this.",
            UserWarning,
            stacklevel=2,
        )
        return None
    lib.fieldkit_delta.restype = ctypes.c_int
    lib.fieldkit_delta.argtypes = [
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_double),
    ]
    return lib


def _cache_dir() -> Path:
    root = os.environ.get("FIELDKIT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    path = Path(root) / "fieldkit" if root else Path.home() / ".cache" / "fieldkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fusable(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether the kernel can take this pair (it still has to be :func:`library`-available)."""
    return (
        after.device.type == before.device.type == "cpu"
        and after.dtype == before.dtype in DTYPES
        and after.is_contiguous()
        and before.is_contiguous()
    )


def measure(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """``(sum of squares, max|Δ|)`` of ``after - before`` over :func:`fusable` pairs.

    The pointers are read from the tensors at each call, so a tensor re-pointed since the
    pairs were chosen is read where it is now; the caller keeps the tensors alive.
    """
    lib = library()
    assert lib is not None, "measure() needs the kernel: check library() first"
    by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for b, a in pairs:
        by_dtype.setdefault(a.dtype, []).append((b, a))
    sq, max_abs = 0.0, 0.0
    out = (ctypes.c_double * 2)()
    for dtype, group in by_dtype.items():
        n = len(group)
        counts = [a.numel() for _, a in group]
        threads = max(1, min(torch.get_num_threads(), sum(counts) // PER_THREAD))
        if lib.fieldkit_delta(
            n,
            (ctypes.c_void_p * n)(*[a.data_ptr() for _, a in group]),
            (ctypes.c_void_p * n)(*[b.data_ptr() for b, _ in group]),
            (ctypes.c_int64 * n)(*counts),
            DTYPES[dtype],
            threads,
            out,
        ):
            raise MemoryError("weight_delta: the C kernel could not allocate its work list")
        sq += out[0]
        max_abs = max(max_abs, out[1])
    return sq, max_abs
