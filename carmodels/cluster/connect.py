"""Connecting to Ray: a missing install or an unreachable cluster is one line, not a traceback.

Ray is an optional extra (``carmodels[ray]``) and is imported only inside these functions, so
``import carmodels`` works without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from carmodels.errors import InputError, one_line

log = logging.getLogger(__name__)

#: What a caller of the Ray path sees when Ray is not installed.
RAY_MISSING = "Ray is not installed: pip install 'carmodels[ray]'"
#: The address that starts a Ray head on this machine, bound to 127.0.0.1.
LOCAL = "local"
#: How each kind of address is written, for error messages.
ADDRESS_FORMS = "ray://head:10001 (Ray Client), head:6379, auto, or local"

#: Seconds to wait for a cluster's port to answer before ``ray.init`` is tried: Ray itself
#: retries an unreachable head for many minutes, which would hang the step with no word.
REACH_TIMEOUT_S = 10.0

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
# Ray's switch between "cluster" and "this machine only" address resolution (see below).
_RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray() -> ModuleType:
    """The ``ray`` module, or an :class:`InputError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(RAY_MISSING) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """The ``(host, port)`` an address names (``ray://head:10001``, ``head:6379``), or None
    for ``auto``, ``local`` and other forms Ray resolves itself."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when the address's port does not answer."""
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout_s):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(
            f"Cannot reach the Ray cluster at {address!r} ({reason}): check that it is "
            f"running and that the address is one of {ADDRESS_FORMS}, or unset it to "
            "download on this machine."
        ) from None


def _is_loopback(address: str) -> bool:
    if address == LOCAL:
        return True
    host = address.removeprefix("ray://").rpartition(":")[0] or address
    return host.lower() in _LOOPBACK_HOSTS


@contextlib.contextmanager
def _loopback_addresses(wanted: bool) -> Iterator[None]:
    """Keep Ray on 127.0.0.1 while it starts or connects, when ``wanted``.

    Ray rewrites a loopback address to this machine's outward-facing IP (so that other
    machines could join), which makes a head meant for this machine listen on the network and
    makes ``127.0.0.1:port`` of a head bound to loopback unreachable. Ray's own switch for
    "this machine only" is the platform flag read below (a private constant, so it is set
    only if present, and restored after); the environment variable carries it to the
    processes Ray starts meanwhile.
    """
    if not wanted:
        yield
        return
    try:
        from ray._private import ray_constants
    except ImportError:  # another Ray layout: leave its address resolution alone
        yield
        return
    had_flag = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    saved_env = os.environ.get(_RAY_CLUSTER_ENV)
    if had_flag:
        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_RAY_CLUSTER_ENV] = "0"
    try:
        yield
    finally:
        if had_flag:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_ENV, None)
        else:
            os.environ[_RAY_CLUSTER_ENV] = saved_env


@contextlib.contextmanager
def ray_session(
    address: str,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> Iterator[ModuleType]:
    """Connect to the Ray cluster at ``address`` for the block, and disconnect after.

    ``local`` starts a Ray head on this machine bound to 127.0.0.1 (no dashboard, no usage
    statistics unless ``RAY_USAGE_STATS_ENABLED`` says otherwise), with ``num_cpus`` and
    ``object_store_memory`` (bytes) when given; other addresses (``ray://head:10001``,
    ``head:6379``, ``auto``) connect to a running cluster. When this process is already
    connected, that connection is used and left open. Yields the ``ray`` module.
    """
    ray = require_ray()
    if ray.is_initialized():
        log.info("using this process's Ray connection (not %r)", address)
        yield ray
        return
    address = address.strip()
    if not address:
        raise InputError(f"No Ray address given: pass one of {ADDRESS_FORMS}.")
    kwargs: dict[str, Any] = {}
    if address == LOCAL:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home by default
        kwargs = {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if object_store_memory is not None:
            kwargs["object_store_memory"] = object_store_memory
    elif num_cpus is not None or object_store_memory is not None:
        raise InputError(
            f"num_cpus and object_store_memory size a local Ray head only; the cluster at "
            f"{address!r} has its own. Drop them, or use address {LOCAL!r}."
        )
    if address != LOCAL:
        check_reachable(address)
    try:
        with _loopback_addresses(_is_loopback(address)):
            ray.init(address=address, **kwargs)
    except Exception as error:
        raise InputError(
            f"Cannot start or reach the Ray cluster at {address!r}: {one_line(error, 300)}. "
            f"Check that it is running and that the address is one of {ADDRESS_FORMS}."
        ) from error
    try:
        yield ray
    finally:
        ray.shutdown()
