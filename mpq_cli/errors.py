"""The one error type whose message is shown to users."""


class MpqError(Exception):
    """A problem the user can fix; ``cli.py`` prints its message on one line and exits 2."""
