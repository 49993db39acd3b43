"""One exception type for bad input; the CLI prints it as one line and exits non-zero."""


class JaxftError(Exception):
    """A user-facing error: the message names the value, file or line and what was expected."""
