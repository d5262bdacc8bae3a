"""The router process: the WebSocket front that clients connect to."""
