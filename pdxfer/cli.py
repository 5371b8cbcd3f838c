"""The `pdxfer` command. Each subcommand lives in the module that owns its domain and
exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires them."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# (command path, module, help). Modules are imported lazily so `pdxfer receiver` never
# pays for torch or aiohttp.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("demo",), "pdxfer.bench.demo", "move a chunked KV payload between two processes on this host and verify it"),
    (("receiver",), "pdxfer.bench.receiver_proc", "run a standalone receiver (prints its addresses as JSON)"),
    (("bench", "transfer"), "pdxfer.bench.transfer", "throughput vs a raw-socket baseline, paired runs"),
    (("bench", "spill"), "pdxfer.bench.spill", "streaming from the disk spill tier vs a plain sequential file read, paired"),
    (("bench", "pack"), "pdxfer.pack.bench", "pack/unpack GB/s vs copy and torch gather"),
    (("proxy",), "pdxfer.proxy.cli", "OpenAI-compatible prefill/decode routing proxy"),
    (("chaos",), "pdxfer.chaos.runner", "fault-injection run: kills, freezes, bit flips, resets; checks no corruption/hang/leak"),
]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdxfer", description="KV-cache transfer for disaggregated LLM serving")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument("--log-json", action="store_true", help="JSON log lines on stderr")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        if not _module_exists(module):
            continue
        subs = top
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = top.add_parser(path[0], help=f"{path[0]} subcommands").add_subparsers(
                    dest="subcommand", required=True)
            subs = groups[path[0]]
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            # An optional dependency (torch for `bench pack`, say) is missing: keep the
            # command listed, and say what to install only when someone runs it.
            p = subs.add_parser(path[-1], help=f"{help_text} (unavailable: {exc.name} not installed)",
                                add_help=False)
            p.set_defaults(_missing=(" ".join(path), exc.name or str(exc)))
            p.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        p = subs.add_parser(path[-1], help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = getattr(args, "_missing", None)
    if missing is not None:
        print(f"pdxfer {missing[0]}: needs the Python package {missing[1]!r}, which is not installed"
              f" (for torch: pip install 'pdxfer[torch]' or torch==2.13.0 on CPU)", file=sys.stderr)
        return 2
    from pdxfer.logs import configure

    configure(args.log_level, args.log_json)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
