"""The one exception type the CLI turns into a single-line message and a non-zero exit."""


class Slice2VolError(Exception):
    """A problem with the user's input or request (not a bug): reported as one clear line."""
