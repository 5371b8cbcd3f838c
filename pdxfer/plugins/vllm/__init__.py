"""vLLM v1 KV connector for pdxfer.

Load it with::

    --kv-transfer-config '{"kv_connector": "PdxferConnector",
                           "kv_connector_module_path": "pdxfer.plugins.vllm",
                           "kv_role": "kv_producer" | "kv_consumer",
                           "kv_port": 14579,
                           "kv_connector_extra_config": {...}}'

`PdxferConnector` is imported lazily so the pure parts (`params`, `meta`, `scheduler`)
stay importable, and testable, without vLLM installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PdxferConnector"]


def __getattr__(name: str) -> Any:
    if name == "PdxferConnector":
        from pdxfer.plugins.vllm.connector import PdxferConnector

        return PdxferConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
