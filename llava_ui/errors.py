class UserError(Exception):
    """Something the user can fix: a bad file, too many frames, a context overflow, a missing checkpoint.

    Front ends show the message as it is (no traceback); the command line exits with status 2.
    """


class Stopped(Exception):
    """A stop request landed inside a model step (between two layers): the rest of that step is skipped."""


def check_stop(should_stop) -> None:
    """Between two layers of a model step: raise Stopped when `should_stop()` says so."""
    if should_stop is not None and should_stop():
        raise Stopped
