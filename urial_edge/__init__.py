"""urial-edge: tuning-free alignment of base LLMs on a laptop, with a cached URIAL prefix."""

__version__ = "0.1.0"
