"""The one exception type for user mistakes."""


class UserError(ValueError):
    """Bad input from the user (a file, a field, a flag): the CLI prints it as one line and exits with code 2."""
