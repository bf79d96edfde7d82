"""The one exception type for problems a user can fix (bad input, bad paths, bad options).

The CLI prints an `OmnigptError` as a single line on stderr and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class OmnigptError(Exception):
    """A clear, user-facing error: the message is the whole story."""
