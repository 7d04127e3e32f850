"""Connecting to Ray: ``local`` starts a private instance on loopback, ``auto`` / ``HOST:PORT`` joins a cluster.

A private instance binds only 127.0.0.1. Ray rewrites 127.0.0.1 to the host's routable address and listens on
every interface (``ray._private.services.resolve_ip_for_localhost``) unless its multi-node support is off,
which it reads once, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, when ``ray`` is first imported. For ``local``
the variable is therefore set to ``0`` before the import (unless the caller set it); workers inherit it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

from segsentry.errors import MissingDependencyError, SegsentryError

log = logging.getLogger(__name__)

RAY_EXTRA = "distributed"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray instance stays on 127.0.0.1


def import_ray(*, loopback: bool = False) -> ModuleType:
    """``import ray``, or a :class:`MissingDependencyError` naming ``segsentry[distributed]``.

    ``loopback``: keep a Ray instance started by this process on 127.0.0.1 (see the module docstring); it
    only takes effect when ray is not imported yet, and says so otherwise.
    """
    if loopback:
        if "ray" not in sys.modules:
            os.environ.setdefault(LOOPBACK_ENV, "0")
        elif os.environ.get(LOOPBACK_ENV) != "0":
            log.warning("ray was imported before segsentry could keep the local instance on 127.0.0.1; it may "
                        "listen on every interface (set %s=0 before importing ray)", LOOPBACK_ENV)
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise MissingDependencyError("ray", RAY_EXTRA, "ood-run --ray") from exc


@contextlib.contextmanager
def ray_session(address: str, *, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Yield the ``ray`` module connected to ``address`` and disconnect afterwards.

    ``local``: start a private instance on this machine (``num_cpus`` logical CPUs, default all), stopped on
    exit. ``auto``: the cluster ``ray start`` recorded on this machine (or ``RAY_ADDRESS``). ``HOST:PORT``:
    that cluster's head (GCS) address; a joined cluster keeps running. If this process is already connected
    (``ray.init`` was called), that connection is used and left open.
    """
    address = address.strip()
    local = address.lower() == "local"
    if not address or (not local and address.lower() != "auto" and ":" not in address):
        raise SegsentryError(f"--ray {address!r}: give 'local' (a private Ray instance), 'auto' (the cluster "
                             "started on this machine with `ray start`) or HOST:PORT of a cluster's head")
    ray = import_ray(loopback=local)
    if ray.is_initialized():
        yield ray
        return
    settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    try:
        if local:
            ray.init(address="local", num_cpus=num_cpus, **settings)
        else:
            ray.init(address=address.lower() if address.lower() == "auto" else address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SegsentryError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}. "
                             "Start one with `ray start --head`, or use --ray local") from exc
    try:
        yield ray
    finally:
        ray.shutdown()
