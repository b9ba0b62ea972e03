"""The errors of storage roots, and the one-line explanations they carry."""

from __future__ import annotations

import fsspec
from fsspec.registry import known_implementations

from carmodels.errors import InputError


class StorageError(RuntimeError):
    """A storage root that cannot be used as asked; the message names the root and the fix."""


class StorageInputError(StorageError, InputError):
    """A storage root named wrongly or unusable with the credentials at hand: a bad URL, a
    protocol without its package, a missing bucket, refused credentials. Both a `StorageError`
    and an `InputError` (so a ``ValueError``), for callers of either."""


def require_implementation(root: str, protocol: str) -> None:
    """Fail early, naming the package to install, when fsspec cannot open ``protocol``."""
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageInputError(
            f"Storage root {root!r}: {protocol!r} is not a protocol fsspec knows. Use a local "
            "folder or a URL such as s3://bucket/prefix, gcs://bucket/prefix, memory://name."
        ) from None
    except ImportError as exc:
        if protocol in ("s3", "s3a"):
            hint = "install S3 support with `pip install 'carmodels[s3]'` (s3fs)"
        else:
            hint = known_implementations.get(protocol, {}).get("err") or str(exc)
        raise StorageInputError(
            f"Storage root {root!r} needs a package fsspec lacks: {hint}."
        ) from exc


def is_setup_problem(exc: Exception) -> bool:
    """Whether ``exc`` says the root or its credentials are wrong (see `explain`)."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, PermissionError | FileNotFoundError) or any(
        "Credential" in k for k in kinds
    )


def explain(root: str, action: str, exc: Exception) -> str:
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    if isinstance(exc, PermissionError) or any("Credential" in k for k in kinds):
        hint = (
            "check the credentials for this root (for S3: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key/secret in the storage options) and that "
            "they may read and write it"
        )
    elif isinstance(exc, FileNotFoundError):
        hint = "check that the bucket and prefix exist"
    elif isinstance(exc, ConnectionError | TimeoutError) or "Endpoint" in "".join(kinds):
        hint = "check the endpoint URL and the network"
    else:
        hint = "see the error above"
    return f"Storage root {root}: {action} failed ({type(exc).__name__}: {exc}); {hint}."


__all__ = [
    "StorageError",
    "StorageInputError",
    "explain",
    "is_setup_problem",
    "require_implementation",
]
