"""The one error type whose message is shown to users."""


class MpqError(Exception):
    """A problem the user can fix; ``cli.py`` prints its message on one line and exits 2."""


class StaleRunError(MpqError):
    """A finished run directory made with other settings than the ones asked for now."""
