"""Proxy configuration: one frozen dataclass, and the argparse flags that fill it.

Every wait the proxy does is bounded by a field here; there is no "no timeout" value.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from urllib.parse import urlsplit

FLOWS = ("sequential", "concurrent")
POLICIES = ("round_robin", "least_outstanding")


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/` -> `http://host:port` (no trailing slash)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url.rstrip("/")


def normalize_policy(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    aliases = {"rr": "round_robin", "low": "least_outstanding", "least_outstanding_work": "least_outstanding"}
    key = aliases.get(key, key)
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return key


@dataclass(frozen=True)
class ProxyConfig:
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    flow: str = "sequential"
    policy: str = "round_robin"
    # deadlines (seconds)
    connect_timeout: float = 5.0
    prefill_timeout: float = 120.0
    decode_timeout: float = 600.0  # whole decode leg, first byte to last
    read_timeout: float = 60.0  # longest silence between two chunks of a stream
    first_token_timeout: float = 120.0  # request start to the decode leg's first chunk
    misc_timeout: float = 10.0  # /v1/models and the like
    # health checks
    health_interval: float = 2.0
    health_timeout: float = 2.0
    unhealthy_after: int = 2  # consecutive failed probes that take a worker out
    healthy_after: int = 1  # consecutive good probes that bring it back
    # behaviour
    prefill_retries: int = 2  # extra prefill workers tried when one fails before KV moved
    decode_retries: int = 1  # extra decode workers tried when one could not be reached
    max_in_flight: int = 2048  # requests beyond this get 503 at once (bounded memory)
    max_body_bytes: int = 32 * 1024 * 1024
    drain_timeout: float = 30.0
    upstream_connections: int = 4096
    log_level: str = "info"
    log_json: bool = False

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ValueError("at least one --prefill URL is needed")
        if not self.decode:
            raise ValueError("at least one --decode URL is needed")
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r}; choose one of {', '.join(FLOWS)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}")
        for name in (
            "connect_timeout",
            "prefill_timeout",
            "decode_timeout",
            "read_timeout",
            "first_token_timeout",
            "misc_timeout",
            "health_interval",
            "health_timeout",
            "drain_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (every wait has a deadline)")
        if self.unhealthy_after < 1 or self.healthy_after < 1:
            raise ValueError("unhealthy_after and healthy_after must be >= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProxyConfig:
        return cls(
            prefill=tuple(normalize_url(u) for u in args.prefill),
            decode=tuple(normalize_url(u) for u in args.decode),
            host=args.host,
            port=args.port,
            flow=args.flow,
            policy=normalize_policy(args.policy),
            connect_timeout=args.connect_timeout,
            prefill_timeout=args.prefill_timeout,
            decode_timeout=args.decode_timeout,
            read_timeout=args.read_timeout,
            first_token_timeout=args.first_token_timeout,
            health_interval=args.health_interval,
            health_timeout=args.health_timeout,
            unhealthy_after=args.unhealthy_after,
            healthy_after=args.healthy_after,
            prefill_retries=args.prefill_retries,
            decode_retries=args.decode_retries,
            max_in_flight=args.max_in_flight,
            drain_timeout=args.drain_timeout,
            log_level=args.log_level,
            log_json=args.log_json,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ProxyConfig.__dataclass_fields__
    g = parser.add_argument_group("workers")
    g.add_argument("--prefill", nargs="+", required=True, metavar="URL", help="prefill worker base URLs")
    g.add_argument("--decode", nargs="+", required=True, metavar="URL", help="decode worker base URLs")
    g = parser.add_argument_group("serving")
    g.add_argument("--host", default=d["host"].default, help="listen address (default %(default)s)")
    g.add_argument("--port", type=int, default=d["port"].default, help="listen port (default %(default)s)")
    g.add_argument(
        "--flow",
        choices=FLOWS,
        default=d["flow"].default,
        help="sequential: prefill (max_tokens=1) then decode with its kv_transfer_params "
        "(vLLM NixlConnector); concurrent: both legs at once sharing a transfer id "
        "(PdxferConnector). Default %(default)s",
    )
    g.add_argument(
        "--policy",
        default=d["policy"].default,
        help="round_robin | least_outstanding (tokens in flight). Default %(default)s",
    )
    g.add_argument("--max-in-flight", type=int, default=d["max_in_flight"].default)
    g.add_argument("--drain-timeout", type=float, default=d["drain_timeout"].default,
                   help="seconds to let in-flight requests finish on shutdown")
    g = parser.add_argument_group("deadlines (seconds)")
    g.add_argument("--connect-timeout", type=float, default=d["connect_timeout"].default)
    g.add_argument("--prefill-timeout", type=float, default=d["prefill_timeout"].default)
    g.add_argument("--decode-timeout", type=float, default=d["decode_timeout"].default)
    g.add_argument("--read-timeout", type=float, default=d["read_timeout"].default,
                   help="longest silence between two chunks of an upstream response")
    g.add_argument("--first-token-timeout", type=float, default=d["first_token_timeout"].default)
    g = parser.add_argument_group("health and retries")
    g.add_argument("--health-interval", type=float, default=d["health_interval"].default)
    g.add_argument("--health-timeout", type=float, default=d["health_timeout"].default)
    g.add_argument("--unhealthy-after", type=int, default=d["unhealthy_after"].default)
    g.add_argument("--healthy-after", type=int, default=d["healthy_after"].default)
    g.add_argument("--prefill-retries", type=int, default=d["prefill_retries"].default)
    g.add_argument("--decode-retries", type=int, default=d["decode_retries"].default)
    g = parser.add_argument_group("logging")
    g.add_argument("--log-level", default=d["log_level"].default)
    g.add_argument("--log-json", action="store_true", help="JSON log lines instead of console")
