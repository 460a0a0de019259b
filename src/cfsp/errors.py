"""Exception types the CLI turns into a one-line message and an exit code instead of a trace."""


class CfspError(ValueError):
    """A problem with the user's input, with a message that names the problem and the fix."""


class PeerFailed(CfspError):
    """Another process of a multi-process run failed (and reported it); this one stops quietly."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised so that cleanup runs as it does for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
