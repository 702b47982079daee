"""The one base of the errors each stage raises for bad input or a broken environment (a
damaged capture, a malformed rule or config file, a model made for another schema). The
command line catches ``QuietwireError`` and prints its message as one line, exit 2 or 1."""


class QuietwireError(Exception):
    """A problem the user can act on; the message names the file, record or field."""
