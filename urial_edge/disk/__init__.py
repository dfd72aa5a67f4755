"""Where urial-edge keeps things on disk, and how it writes them (atomically, durably)."""
