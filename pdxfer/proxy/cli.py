"""`pdxfer proxy`: the entry points the top-level CLI wires in.

    add_arguments(parser)  # fills a (sub)parser with the proxy's flags
    run(args) -> int       # runs the proxy on uvloop until SIGTERM/SIGINT, then drains
"""

from __future__ import annotations

import argparse
import logging
import sys

import structlog

from pdxfer.proxy.config import ProxyConfig
from pdxfer.proxy.config import add_arguments as _add_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)


def configure_logging(level: str, json_lines: bool) -> None:
    lvl = logging.getLevelName(level.upper())
    if not isinstance(lvl, int):
        lvl = logging.INFO
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = ProxyConfig.from_args(args)
    except ValueError as exc:
        print(f"pdxfer proxy: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level, cfg.log_json)
    from pdxfer.proxy.server import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; stay usable without it
        import asyncio

        return asyncio.run(serve(cfg))
    return uvloop.run(serve(cfg))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdxfer proxy", description="OpenAI-compatible PD routing proxy")
    add_arguments(parser)
    return run(parser.parse_args(argv))
