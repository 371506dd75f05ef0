class UserError(Exception):
    """Something the user can fix: a bad file, too many frames, a context overflow, a missing checkpoint.

    Front ends show the message as it is (no traceback); the command line exits with status 2.
    """
