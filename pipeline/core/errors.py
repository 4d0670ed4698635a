"""The one base class of the errors a user can fix from the message alone.

Every such error names the params key or the file at fault. Stage entry points
(:func:`stages.run_stage`) catch :class:`UserError` (and ``OSError``: a missing
input, permissions, a full disk) and print one line instead of a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad params, bad data or a foreign file: the message says which and what to do."""
