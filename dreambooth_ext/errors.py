"""The one error type a user sees: a sentence that names the file and the fix."""


class UserError(Exception):
    """Bad input or an unsupported file. The message is shown as-is, without a traceback."""


class Cancelled(Exception):
    """A stop asked for while work was under way (converting, scanning, class images, caching)."""
