"""The command group every ``urial-edge`` command belongs to: expected failures become one line and an exit code.

Exit codes: 0 success, 1 error, 2 bad usage (click's own), 3 a batch finished
with invalid lines, 130 interrupted.
"""

import os
import sys

import click

from ..errors import UrialError, one_line

EXIT_ERROR, EXIT_BATCH_INVALID, EXIT_INTERRUPTED = 1, 3, 130


def fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class Group(click.Group):
    """A command group that turns expected failures into one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UrialError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except Exception as e:
            if os.environ.get("URIAL_EDGE_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {one_line(e)} "
                 "(set URIAL_EDGE_DEBUG=1 for a traceback)")
