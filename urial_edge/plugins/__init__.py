"""urial-edge as a plugin of other tools (``llm``)."""
