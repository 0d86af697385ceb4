"""Text from outside (producers, payloads, file names) made safe to print."""

import re

CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` for a terminal or a log line: control characters become their escapes
    (ESC -> \\x1b, newline -> \\n), everything else stays as it is."""
    if CONTROL_RE.search(text) is None:
        return text
    return CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)
