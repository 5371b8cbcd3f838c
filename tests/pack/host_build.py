"""Builds a csrc/ kernel for the host through one of the shims in this folder (g++), for
the tests that run kernel source on CPU against its reference."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pdxfer.pack.cuda import KERNEL_FILE, kernel_dirs

HERE = Path(__file__).resolve().parent


def _kernel_path(name: str = KERNEL_FILE) -> Path:
    for d in kernel_dirs():
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(name)


def build_host_kernel(kernel: str, shim: str, out_dir: Path) -> ctypes.CDLL:
    """csrc/<kernel> compiled for the host through tests/pack/<shim> with g++, loaded."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler in CI: the host-compiled kernel tests cannot run")
        pytest.skip("no C++ compiler")
    lib_path = out_dir / f"lib{Path(shim).stem}.so"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC",
           f'-DPDX_KERNEL_SOURCE="{_kernel_path(kernel)}"', str(HERE / shim), "-o", str(lib_path)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"host build of {kernel} failed:\n{' '.join(cmd)}\n{res.stderr}"
    return ctypes.CDLL(str(lib_path))
