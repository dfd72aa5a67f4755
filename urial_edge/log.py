"""Warnings for users, through the ``logging`` machinery (logger ``urial_edge``).

They print as ``warning: <one line>`` on standard error by default; an
application can attach its own handlers to the ``urial_edge`` logger instead.
"""

import logging
import sys

logger = logging.getLogger("urial_edge")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so captured streams work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


if not logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
    _handler.addFilter(lambda record: setattr(record, "levelname_lower", record.levelname.lower()) or True)
    logger.addHandler(_handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def warn(message: str) -> None:
    """One line on standard error (through logging), whitespace folded."""
    logger.warning(" ".join(message.split()))
