"""garin: a sharded WebSocket chat-room server, wire-compatible with GarinChat."""

__version__ = "0.1.0"
