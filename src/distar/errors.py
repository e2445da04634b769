"""The one exception type for mistakes a user can make (bad file, bad URI, unknown config key).

The CLI prints its message and exits with code 2, without a traceback; every other exception is a
bug and keeps its traceback.
"""

import re


class UserError(ValueError):
    """A problem with the user's input; the message names the input and says what to do."""


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`text` with credentials inside URIs (scheme://user:token@host/…) replaced by ***, for config files, logs
    and error messages."""
    return _CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", str(text))
