"""The export service, the WebSocket gateway, and what they share."""
