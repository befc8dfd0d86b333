"""The browser client (`web/`): its fold against the shared vectors, and its Node tests."""
