"""One exception type for bad input, so the CLI can print a one-line message instead of a trace."""


class CfspError(ValueError):
    """A problem with the user's input, with a message that names the problem and the fix."""
