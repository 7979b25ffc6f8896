"""Errors Tiny-ONN raises for bad input. Each message names the file, line, field or option at fault.

`exit_code` is what the `tinyonn` command exits with: 2 for bad input (the user can fix the
command or its files), 1 for a failure of the run itself (`RunFailure`).
"""

from __future__ import annotations


class TinyONNError(Exception):
    """Base class of every error Tiny-ONN raises on purpose."""

    exit_code = 2


class DataFormatError(TinyONNError, ValueError):
    """A data file is malformed: the message names the file and the line."""

    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class NoSamplesError(TinyONNError, ValueError):
    """No sample is left to work on (every example was skipped or the data set is empty)."""


class UnsupportedArchitectureError(TinyONNError, ValueError):
    """The model's MLP is not a SwiGLU gate/up/down MLP that Tiny-ONN understands."""


class TeacherNotFoundError(TinyONNError, FileNotFoundError):
    """The teacher directory or hub id could not be found or loaded."""


class WeightsError(TinyONNError, ValueError):
    """A weights file (teacher shard, saved model, checkpoint) is truncated, damaged, unsafe or of
    the wrong shapes: the message names the file (and the tensor)."""


class DeviceError(TinyONNError, ValueError):
    """The requested device does not exist or is not available on this machine."""


class RunFailure(TinyONNError):
    """The run failed for a reason outside its inputs (disk full, I/O error): rerun once fixed."""

    exit_code = 1


class DataNotFoundError(TinyONNError, FileNotFoundError):
    """A data file or a folder of splits is missing, or a folder holds no probe splits."""


class DataSourceError(TinyONNError, ValueError):
    """A data source cannot be used as asked (an unknown split, a held-out split that is missing)."""


class ModelFolderError(TinyONNError, ValueError):
    """A model folder (teacher or saved model) lacks a file it needs (weights, tokenizer) or holds a
    damaged one: the message names the folder and the file."""
