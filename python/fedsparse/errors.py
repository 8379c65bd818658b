"""Exception types of fedsparse."""


class PayloadError(ValueError):
    """A packed payload is malformed: truncated, corrupted, hostile or of an unknown version.

    Raised by every parser of bytes that came over the wire; nothing else escapes them.
    """


class PackError(ValueError):
    """An update cannot be packed as asked: NaN/Inf values, a mismatched head mask, bad options."""
