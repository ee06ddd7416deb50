"""The errors cellmask raises for what a user can fix: bad input, settings, or output state.

Every one of them derives from :class:`CellmaskError`, so that the command line can tell a
refusal (exit status 2, one line saying what to do) from an internal failure (exit status 1,
"internal error" and how to see the traceback). Each also derives from the built-in type a
Python caller would expect (``ValueError``, ``FileExistsError``, ...).
"""

from __future__ import annotations


class CellmaskError(Exception):
    """A refusal the user can act on; its message says what to do."""


class InputError(CellmaskError, ValueError):
    """An image or setting that cellmask cannot segment, with a message saying what to do."""


class WeightsError(CellmaskError, ValueError):
    """A weights file that cellmask refuses to load."""


class OutputLocked(CellmaskError, RuntimeError):
    """Another live run is writing the same output."""


class OutputConflict(CellmaskError, FileExistsError):
    """The output holds something this run must not replace: another run's labels (other
    input or settings), labels of another tool, or cellmask labels a user has edited."""
