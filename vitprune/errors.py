"""Errors that the CLI reports as one line (no traceback) with a non-zero exit."""


class VitPruneError(Exception):
    """A user-facing error: bad input, bad configuration or an unmet precondition."""
