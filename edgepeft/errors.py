"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class EdgepeftError(Exception):
    """A mistake in the user's input (recipe, model, data) or a failed check, worded for the user."""
