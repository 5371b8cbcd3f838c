"""The wire protocol, sans I/O: messages, data framing, per-transfer state machines."""
