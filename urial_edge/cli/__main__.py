"""``python -m urial_edge.cli``: the same as the ``urial-edge`` command."""

from .main import main

main()
