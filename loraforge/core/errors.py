"""Errors a user can act on. The CLI prints them without a traceback and exits with status 2."""


class LoraforgeError(Exception):
    """Base class: the message names what is wrong and, where it helps, how to fix it."""


class DataError(LoraforgeError):
    """A data file that cannot be used: names the file, the line and what is wrong."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line, self.reason = str(path), line, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")


class ModelNotFoundError(LoraforgeError):
    """A model name that is neither embedded nor a path on disk."""


class AdapterError(LoraforgeError):
    """An adapter that does not fit the model, or a config that cannot be honoured."""


class TrainingError(LoraforgeError):
    """The run cannot go on (NaN loss, a checkpoint from another run, ...)."""



class WriteError(LoraforgeError):
    """An output that could not be written (a full disk, a file size limit, a path that is not a
    folder): what was there before is unchanged."""
