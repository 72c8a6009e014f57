"""The one exception type the command line turns into a single error line."""


class CnaError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, and so on."""


def first_line(exc: BaseException) -> str:
    """First non-empty line of an exception's message (or its type name), for one-line errors."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
