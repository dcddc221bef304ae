"""The one exception type for problems a user can cause and fix.

The CLI prints its message on one line and exits with status 2; everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class VlmCreditError(Exception):
    """A user-caused error (bad path, bad checkpoint, bad row, impossible parameter).

    The message must name the offending input and say what to do about it, on one line.
    """

    exit_code = 2
