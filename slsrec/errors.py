"""User-facing errors. The CLI prints these as one clear line (no stack trace) and exits with 2."""


class UserError(Exception):
    """Base for every error caused by the user's input: a bad file, flag, checkpoint or service."""


class DataError(UserError):
    """Bad input data. The message names the file, and the row and column where known."""


class CheckpointError(UserError):
    """A run directory that is missing, of an unknown format version, or not safetensors+JSON."""


class ServiceError(UserError):
    """A local service (Kafka, Redis) that cannot be started or reached."""


class Unavailable(ServiceError):
    """A service that did not answer (down, frozen, past a deadline, or a circuit breaker open): a
    condition that passes, unlike refused credentials or an untrusted certificate. A long-running
    process waits it out instead of exiting."""
