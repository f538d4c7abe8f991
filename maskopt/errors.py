"""The one exception maskopt raises for bad input; the CLI prints its message as a one-line error."""


class MaskoptError(ValueError):
    """Bad input: a file, option or model that does not fit. The message names the problem."""
