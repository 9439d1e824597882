"""The one exception type of the conversion tools: its message is a complete one-line diagnosis."""


class ConversionError(Exception):
    """Bad input to a converter (file, key, shape, flag); `str(err)` names the problem."""
