"""One exception type for bad input; the CLI prints it as one line and exits non-zero."""

import argparse
import json
import sys


class JaxftError(Exception):
    """A user-facing error: the message names the value, file or line and what was expected."""


def read_text(path) -> str:
    """A file's text as UTF-8 whatever the locale, as transformers reads its files; other bytes are one
    line naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise JaxftError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path):
    """A JSON file's value (`read_text`); invalid JSON is one line naming the file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise JaxftError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def printable_stdout() -> None:
    """Model and data text printed where stdout's encoding cannot write every character (a GBK or cp1252
    console): such a character is written `?` instead of a UnicodeEncodeError ending the CLI after its
    work is done. A UTF-8 stdout is left as it is; PYTHONIOENCODING=utf-8 keeps every character."""
    import codecs

    try:
        utf8 = codecs.lookup(sys.stdout.encoding or "ascii").name == "utf-8"
    except (AttributeError, LookupError):
        utf8 = False
    if not utf8 and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage error is one `error:` line and exit status 2, like other bad input,
    not a usage page."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def one_line_errors(main):
    """A CLI's `main(argv)` whose JaxftError (bad input) is one line on stderr and exit status 2."""

    def guarded(argv):
        try:
            return main(argv)
        except JaxftError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return guarded
