"""The HTTP server's subpackage; for now only the chat page and its files (static.py, page/)."""
