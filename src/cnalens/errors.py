"""The one exception type the command line turns into a single error line."""


class CnaError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, and so on."""
