r"""The one exception maskopt raises for bad input, and how any exception becomes one line of it.

    >>> first_line(OSError("no such file\nTraceback (most recent call last): ..."))
    'no such file'
    >>> first_line(KeyError()), first_line(KeyError(), empty="")
    ('KeyError', '')
"""


class MaskoptError(ValueError):
    """Bad input: a file, option or model that does not fit. The message names the problem."""


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The first non-empty line of `e`'s message; for an empty message `empty`, by default the type's name."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if empty is None else empty
