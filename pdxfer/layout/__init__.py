"""What a KV transfer looks like: payload chunking, and (issue 4) paged KV layouts."""

from pdxfer.layout.payload import Payload

__all__ = ["Payload"]
