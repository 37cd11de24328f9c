"""The data layer's one user-facing error, in its own module so that the loaders and the downloads share it."""


class DatasetError(Exception):
    """A user-facing problem with the data (missing download, empty class, unknown name)."""
