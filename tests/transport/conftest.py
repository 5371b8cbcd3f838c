"""The control-channel tests' loop fixture (see control_harness.py)."""

from tests.transport.control_harness import run  # noqa: F401  (a fixture)
