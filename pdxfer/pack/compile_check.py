"""Compile every csrc/*.cu with the local nvcc for sm_80 and sm_90; fail loudly.

Users never build the kernels (NVRTC compiles them at run time), so without this a
syntax or type error would first show on someone's GPU. CI runs it without a GPU:

    python -m pdxfer.pack.compile_check            # exit 1 on any failure, 2 if no nvcc

It also checks that sources stay NVRTC-friendly: NVRTC has no host headers, so the
kernels may not #include anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-std=c++17", "--Werror", "all-warnings")
_INCLUDE = re.compile(r"^\s*#\s*include\b", re.MULTILINE)


def default_csrc() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


def find_nvcc() -> str | None:
    """nvcc from $NVCC, PATH, $CUDA_HOME or /usr/local/cuda."""
    if os.environ.get("NVCC"):
        return os.environ["NVCC"]
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def kernel_files(csrc: Path) -> list[Path]:
    return sorted(csrc.glob("*.cu"))


@dataclass(frozen=True)
class Result:
    source: Path
    arch: str
    ok: bool
    output: str


def nvrtc_problems(source: Path) -> list[str]:
    """Reasons a source would not compile under NVRTC (as CuPy's RawModule uses it)."""
    text = source.read_text()
    problems = []
    if _INCLUDE.search(text):
        problems.append(f"{source.name}: #include is not available under NVRTC")
    if 'extern "C"' not in text:
        problems.append(f'{source.name}: no extern "C" entry point for RawModule.get_function')
    return problems


def compile_one(nvcc: str, source: Path, arch: str) -> Result:
    """nvcc -c for one architecture: device code and host stubs, warnings as errors."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, f"-arch={arch}", *NVCC_FLAGS, "-c", str(source), "-o", str(Path(tmp) / "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    output = (" ".join(cmd) + "\n" + res.stdout + res.stderr).strip()
    return Result(source, arch, res.returncode == 0, output)


def compile_all(nvcc: str, csrc: Path, archs: tuple[str, ...] = ARCHS) -> list[Result]:
    jobs = [(s, a) for s in kernel_files(csrc) for a in archs]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda job: compile_one(nvcc, *job), jobs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csrc", type=Path, default=default_csrc())
    parser.add_argument("--arch", action="append", help="override the architectures (repeatable)")
    parser.add_argument("--allow-missing-nvcc", action="store_true", help="exit 0 when nvcc is absent")
    args = parser.parse_args(argv)
    sources = kernel_files(args.csrc)
    if not sources:
        print(f"no .cu files in {args.csrc}", file=sys.stderr)
        return 1
    problems = [p for s in sources for p in nvrtc_problems(s)]
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 1 if problems else (0 if args.allow_missing_nvcc else 2)
    results = compile_all(nvcc, args.csrc, tuple(args.arch or ARCHS))
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.source.name} {r.arch}")
        if not r.ok:
            print(r.output, file=sys.stderr)
    return 0 if all(r.ok for r in results) and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
