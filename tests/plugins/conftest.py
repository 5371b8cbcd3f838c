"""Fixtures for the vLLM connector tests: tests/ on sys.path for `vllm_support`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ -> `import vllm_support`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import connector_testlib`

from vllm_support.fixtures import *  # noqa: E402,F403
from vllm_support.fixtures import TIMINGS  # noqa: E402


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("vllm timings")
        for k, v in TIMINGS.items():
            terminalreporter.write_line(f"{k}: {v}")
