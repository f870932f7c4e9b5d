"""Keep the calling thread's alternate signal stack valid after OpenVINO has used the CPU.

OpenVINO's CPU plugin gives the thread that creates it a larger alternate signal stack (AMX tile state does not fit
the default one) and, when destroyed, puts back the stack it replaced, but only if its own is still current. Two
plugins destroyed in the order they were created (each ``openvino.Core`` has its own; Python's garbage collector
picks the order) therefore leave the first one's stack installed after it was unmapped. The next signal delivered
with a Python handler (Python installs them with ``SA_ONSTACK``: torch's DataLoader catches ``SIGCHLD``, for one)
then finds no stack, and the kernel kills the process with SIGSEGV: on 2026-12-08 the test suite's worker died
this way when a subprocess exited after the compression chain had timed OpenVINO models.

:func:`install_own_signal_stack` installs one stack owned by this process for its lifetime; called after every
block that may create OpenVINO plugins, it is what later plugin destructors find current, so they leave it alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

AT_MINSIGSTKSZ = 51  # getauxval key: the kernel's minimum signal frame for this CPU's enabled register state
STACK_BYTES = 256 * 1024  # well above that minimum with AMX (about 11 KB) and above SIGSTKSZ on any libc


class StackT(ctypes.Structure):
    """``stack_t`` of <signal.h> on Linux."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigaltstack.argtypes = [ctypes.POINTER(StackT), ctypes.POINTER(StackT)]
    libc.getauxval.restype = ctypes.c_ulong
    libc.getauxval.argtypes = [ctypes.c_ulong]
    return libc


@functools.cache
def _own_stack() -> tuple[ctypes.Array, StackT]:
    """One stack for the process's lifetime and its descriptor (cached, never freed: a thread may keep it installed
    to the end)."""
    size = max(STACK_BYTES, 4 * int(_libc().getauxval(AT_MINSIGSTKSZ)))
    memory = ctypes.create_string_buffer(size)
    return memory, StackT(ctypes.cast(memory, ctypes.c_void_p), 0, size)


def signal_stack_address() -> int:
    """Where the calling thread's alternate signal stack starts (0: none; Linux)."""
    current = StackT()
    if _libc().sigaltstack(None, ctypes.byref(current)):
        raise OSError(ctypes.get_errno(), f"sigaltstack: {os.strerror(ctypes.get_errno())}")
    return int(current.ss_sp or 0)


def install_own_signal_stack() -> None:
    """Make the process's own stack the calling thread's alternate signal stack (a no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    _, own = _own_stack()
    if signal_stack_address() == own.ss_sp:
        return
    if _libc().sigaltstack(ctypes.byref(own), None):
        raise OSError(ctypes.get_errno(), f"sigaltstack: {os.strerror(ctypes.get_errno())}")
