"""The one error the loader raises for a bad model source."""

from __future__ import annotations


class ModelSourceError(Exception):
    """A model source cannot be used; the message names the path and what is wrong with it.

    Raised for anything the user can fix (a missing path, a folder without config.json or
    weights, an unsupported architecture, a corrupt file, a missing package), so callers can
    print it as is instead of a library traceback.
    """
