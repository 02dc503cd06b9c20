"""The exception type of `geoseg.stac`, in its own module so every submodule can raise it."""


class StacError(RuntimeError):
    """A user-facing, one-line STAC problem (unreachable API, missing collection, bad item).

    The CLI prints these without a traceback, so messages must say what failed and where.
    """
