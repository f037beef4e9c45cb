"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class EdgepeftError(Exception):
    """A mistake in the user's input (recipe, model, data) or a failed check, worded for the user."""


def first_line(e: BaseException) -> str:
    """A third-party exception's message reduced to one line, for an EdgepeftError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
