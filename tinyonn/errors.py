"""Errors Tiny-ONN raises for bad input. Each message names the file, line or field at fault."""

from __future__ import annotations


class TinyONNError(Exception):
    """Base class of every error Tiny-ONN raises on purpose."""


class DataFormatError(TinyONNError, ValueError):
    """A data file is malformed: the message names the file and the line."""

    def __init__(self, path: str, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class UnsupportedArchitectureError(TinyONNError, ValueError):
    """The model's MLP is not a SwiGLU gate/up/down MLP that Tiny-ONN understands."""


class TeacherNotFoundError(TinyONNError, FileNotFoundError):
    """The teacher directory or hub id could not be found or loaded."""
