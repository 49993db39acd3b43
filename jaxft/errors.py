"""One exception type for bad input; the CLI prints it as one line and exits non-zero."""

import argparse
import sys


class JaxftError(Exception):
    """A user-facing error: the message names the value, file or line and what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage error is one `error:` line and exit status 2, like other bad input,
    not a usage page."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
