"""The errors edgemed raises, and the process exit code each one maps to.

Every error carries a message that names the thing that is wrong and the fix, so that the command line can print
it as a one-line reason. Third-party exceptions are translated at the module boundary with ``raise X(...) from exc``.

    EdgemedError                      exit 1  (base; never raised directly)
    ├── ConfigError                   exit 2  usage or configuration error (bad flag, malformed profile)
    │   ├── DataError                         a dataset file or folder is unusable (names the file and the problem)
    │   └── OutboxLockedError                 another process owns the data directory
    ├── ModelError                    exit 3  model file or manifest unusable
    │   └── ModelRejectedError                the converter's acceptance gate rejected this model
    ├── CaptureError                  exit 4  the frame source is unusable as a whole
    │   └── CodecUnavailableError             one input needs a codec package that is not installed (per input)
    ├── BrokerRefusedError            exit 5  the broker refused us: authentication, TLS, plaintext policy
    ├── DelegateUnavailableError      exit 6  the intended accelerator is absent and CPU fallback is refused
    └── OutboxError                   exit 7  the durable outbox cannot be written (disk full, permissions)

Exit code 10 is not an error class: it means the run finished but results are still pending on disk.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_MODEL = 3
EXIT_SOURCE = 4
EXIT_BROKER = 5
EXIT_DELEGATE = 6
EXIT_OUTBOX = 7
EXIT_PENDING = 10


class EdgemedError(Exception):
    """Base of every error edgemed raises on purpose."""

    exit_code: int = 1


class ConfigError(EdgemedError):
    """A usage or configuration error: the message names the setting and the fix."""

    exit_code = EXIT_CONFIG


class DataError(ConfigError):
    """A dataset file or folder cannot be used for training, calibration or evaluation."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutboxLockedError(ConfigError):
    """Another live process owns the device's data directory."""


class ModelError(EdgemedError):
    """The model file or its manifest cannot be used."""

    exit_code = EXIT_MODEL


class ModelRejectedError(ModelError):
    """The converter's acceptance gate rejected this model; the device refuses to run it."""


class CaptureError(EdgemedError):
    """The frame source as a whole cannot be opened or read."""

    exit_code = EXIT_SOURCE


class CodecUnavailableError(CaptureError):
    """One input is encoded with a codec whose decoder package is missing.

    Attributes:
        codec: the transfer syntax or format name.
        package: the pip requirement that provides a decoder.
    """

    def __init__(self, path: object, codec: str, package: str) -> None:
        self.path = str(path)
        self.codec = codec
        self.package = package
        super().__init__(f"{self.path}: cannot decode {codec}; install it with: pip install {package}")


class BrokerRefusedError(EdgemedError):
    """The broker refused the connection (bad credentials, TLS failure) or policy forbids it."""

    exit_code = EXIT_BROKER


class DelegateUnavailableError(EdgemedError):
    """The intended accelerator cannot be used and the profile refuses CPU fallback.

    Attributes:
        delegate: ``edgetpu`` or ``gpu``.
        reason: why it could not be loaded, with what to install.
    """

    exit_code = EXIT_DELEGATE

    def __init__(self, delegate: str, reason: str) -> None:
        self.delegate = delegate
        self.reason = reason
        super().__init__(f"{delegate} delegate unavailable: {reason}")


class OutboxError(EdgemedError):
    """The durable outbox cannot be written; results would be lost, so the run stops."""

    exit_code = EXIT_OUTBOX
