"""Progress bars on standard error, drawn by tqdm: ``label [####......] done/total``.

Long steps (a model conversion, building a prefix cache, a batch) report
progress through a plain callback ``progress(done, total)``, so the code doing
the work does not depend on how (or whether) it is shown. On a terminal the bar
updates in place; otherwise only its first and last states are printed, one line each.
"""

import sys
from typing import Callable, Optional

Progress = Callable[[int, int], None]
BAR_FORMAT = "{desc} [{bar:30}] {n_fmt}/{total_fmt}"


def progress_bar(label: str) -> Progress:
    """A callback that draws a tqdm bar on stderr."""
    state = {"bar": None, "printed": None}

    def line(done: int, total: int) -> None:
        from tqdm import tqdm

        if done in (0, total) and state["printed"] != (done, total):
            state["printed"] = (done, total)
            sys.stderr.write(tqdm.format_meter(done, total, 0, prefix=label, ascii=".#", bar_format=BAR_FORMAT) + "\n")
            sys.stderr.flush()

    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return line(done, total)
        from tqdm import tqdm

        bar = state["bar"]
        if bar is None or bar.total != total:
            bar = state["bar"] = tqdm(total=total, desc=label, file=sys.stderr, ascii=".#", bar_format=BAR_FORMAT,
                                      mininterval=0.1)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            state["bar"] = None

    return update


def no_progress(done: int, total: int) -> None:
    return None


def optional(progress: Optional[Progress]) -> Progress:
    return progress or no_progress
