"""The runtime's one error hierarchy. Every failure the runtime reports is an `SDRuntimeError`;
which subclass says where it happened:

    SDRuntimeError
    ├── ManifestError      the engine folder or its manifest.json is missing, malformed or unsafe
    │   └── IntegrityError     a file differs from what the manifest records (size, fingerprint, sha256)
    ├── BackendError       an unknown backend, or one that cannot run here or cannot run this folder
    ├── EngineLoadError    a network file cannot be opened by the backend (missing, corrupt, not matching
    │                      the network contract, stale plans)
    ├── EngineInputError   a feed does not match what the engine declares (name, dtype kind, shape)
    ├── EngineRunError     the backend failed while running valid feeds (out of memory, device error)
    │   └── EngineClosedError  the engine was closed
    └── PipelineError      a generation request the folder cannot serve (size, batch, strength, inputs)
        └── ImageInputError    an image or mask argument of an unsupported type, layout, range or size

Errors raised at a backend boundary are always chained (`raise ... from e`), so the backend's own
exception stays on `__cause__`. The classes also derive from the builtin they replace (ValueError
for bad requests and folders, RuntimeError for load and run failures), so `except ValueError`
written against earlier versions keeps working.
"""

from __future__ import annotations


class SDRuntimeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ManifestError(SDRuntimeError, ValueError):
    """An engine folder or its manifest is missing, malformed, of an unknown version, or unsafe."""


class IntegrityError(ManifestError):
    """A file of the engine folder differs from what its manifest records: another size (truncated,
    replaced), another fingerprint (first and last MiB), or, with verify=True, another sha256."""


class BackendError(SDRuntimeError, ValueError):
    """An unknown backend, or one that cannot run on this machine or this engine folder."""


class EngineLoadError(SDRuntimeError, RuntimeError):
    """An engine file cannot be loaded: missing, corrupt, or not matching the network contract."""


class EngineInputError(SDRuntimeError, ValueError):
    """A feed does not match the engine's declared inputs (name, dtype kind or shape)."""


class EngineRunError(SDRuntimeError, RuntimeError):
    """The backend failed while running feeds that passed validation (e.g. out of memory)."""


class EngineClosedError(EngineRunError):
    """`run` was called on an engine after `close()`."""


class PipelineError(SDRuntimeError, ValueError):
    """A generation request the engine folder cannot serve (size, batch, strength, inputs...).
    `field` names the request setting at fault when one is (e.g. "scheduler", "cache_interval"), so a
    server can name its own field for it."""

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class ImageInputError(PipelineError):
    """An image or mask argument has an unsupported type, layout, range or size."""
