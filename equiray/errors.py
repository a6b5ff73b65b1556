"""Exceptions for user mistakes: the CLI prints their message (no traceback) and exits with status 2."""


class EquirayError(Exception):
    """A problem the user can fix; the message says what to do."""


class ConfigError(EquirayError, ValueError):
    """A configuration file or value is wrong (unknown key, wrong type, bad value)."""


class DataError(EquirayError):
    """A data source is missing, corrupt or in an unexpected format."""
