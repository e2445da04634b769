"""The one exception type for mistakes a user can make (bad file, bad URI, unknown config key).

The CLI prints its message and exits with code 2, without a traceback; every other exception is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """A problem with the user's input; the message names the input and says what to do."""
