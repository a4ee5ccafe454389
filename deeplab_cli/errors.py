"""The one exception type for mistakes a user can make (bad file, bad option, no GPU).

The CLI turns it into a one-line message and a non-zero exit; library callers can catch it.
Messages name the file (or option) and the reason, on one line.
"""


class DeeplabError(Exception):
    """A user-facing error: the message is shown as is, without a traceback."""
