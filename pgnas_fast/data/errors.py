"""The one error the data layer raises for a data directory it cannot use.

A `DataError` means "the files are not where, or not what, the loader expects"; its message names
the expected layout and where to get the data, so the CLI can print it as is and exit 2. Bad
arguments (a negative held-out size, an unknown class count) stay plain `ValueError`s.
"""
from __future__ import annotations


class DataError(ValueError):
    """A data directory is missing or malformed; the message says what was expected and where to get it."""
