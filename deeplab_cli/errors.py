"""The one exception type for mistakes a user can make (bad file, bad option, no GPU).

The CLI turns it into a one-line message and a non-zero exit; library callers can catch it.
Messages name the file (or option) and the reason, on one line.
"""

import math


class DeeplabError(Exception):
    """A user-facing error: the message is shown as is, without a traceback."""


def first_line(error: BaseException | str) -> str:
    """The first sentence of an exception's message (its type name when it has none), at
    most 200 characters: the reason part of a one-line error built around a library's."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text.splitlines()[0].split(". ")[0].rstrip(".")[:200]


def short_repr(value: object, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, on one line (`one_line`), to show a bad value
    inside a one-line message. An integer too long for Python to write out (over its
    int_max_str_digits, 4300 digits) is described instead, and so is a value holding one."""
    if isinstance(value, int) and value.bit_length() > 256:
        sign = "a negative" if value < 0 else "an"
        return f"{sign} integer of about {round(value.bit_length() * math.log10(2))} digits"
    try:
        text = repr(value)
    except ValueError:  # a Fraction or other number holding such an integer
        return f"a {type(value).__name__} too long to write out"
    return one_line(text if len(text) <= limit else text[: limit - 3] + "...")


def plural(n: int, noun: str) -> str:
    """`n` and `noun`, the noun plural unless n is 1: '1 image', '2 images', '0 classes'."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (a newline in a file name),
    the undecodable bytes of a name (`\\xff`) and other unprintables escaped."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif "\udc80" <= ch <= "\udcff":  # os.fsdecode's stand-in for a byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)
