"""The exception types the CLI turns into exit codes: user mistakes (2) and interruptions (128 + signal)."""

import signal


class UserError(ValueError):
    """Bad input from the user (a file, a field, a flag): the CLI prints it as one line and exits with code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name
