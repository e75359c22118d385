"""The one exception type users see: its message is a single line that says what to do."""


class QroarError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
