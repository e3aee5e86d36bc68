"""Where the Ray engine runs: a local Ray bound to loopback, or an existing Ray cluster.

``fedrec simulate`` (``engine = "ray"``) hands Flower's Simulation Engine a backend config;
Flower's ``RayBackend`` calls ``ray.init(**init_args)`` with it. With ``ray-address`` empty (and no
``RAY_ADDRESS`` in the environment) that call starts a private Ray on this machine with one CPU per
Flower node, every server of it bound to 127.0.0.1; with ``auto`` or ``host:port`` it joins the
cluster whose head is there, and Ray schedules the nodes' work over every machine of the cluster
(docs/scale.md). No Flower import here; Ray is imported only by :func:`pin_node_ip`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

#: hosts that name this machine's loopback interface
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: Ray's switch between a loopback node IP and the machine's outward one (read from this variable
#: at import; named for the platforms where loopback is Ray's default)
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: what Flower logs on every Ray run that a fedrec user can do nothing about: its deprecation of ``run_simulation``,
#: which the Ray engine calls on purpose (it runs the Simulation Engine in this process: ../shared/FACTS.md), and each
#: node's actor saying it is stopped at the run's end
FLOWER_NOTICES = ("DEPRECATED FEATURE: The `run_simulation` function", "Manually terminating ClientAppActor")


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().lstrip().startswith(FLOWER_NOTICES)


def quiet_flower() -> None:
    """Drop Flower's :data:`FLOWER_NOTICES` from its log in this process (its warnings and errors stay)."""
    flower = logging.getLogger("flwr")
    if _not_a_notice not in flower.filters:
        flower.addFilter(_not_a_notice)


def is_ray_address(address: str) -> bool:
    """Whether a ``ray-address`` value has a form Ray joins: empty (none), ``auto``, or ``host:port``."""
    if address in ("", "auto"):
        return True
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and not any(c.isspace() for c in host))


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A ``host:port`` cluster address whose head answers on that port (Ray itself retries an unreachable one for
    ever); else a ``ConnectionError`` of one sentence. Empty (a local Ray) and ``auto`` pass."""
    import socket

    if address in ("", "auto"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"No Ray cluster answers at {address} ({e}); start its head there (`ray start --head`) "
                              "or name another ray-address.") from None


def cluster_address(ray_address: str) -> str:
    """The cluster to join: the ``ray-address`` key, else ``RAY_ADDRESS``, else "" (start a local Ray)."""
    return ray_address or os.environ.get("RAY_ADDRESS", "").strip()


def on_loopback(address: str) -> bool:
    """Whether Ray's processes on this machine use 127.0.0.1: a local Ray, or a cluster on loopback."""
    return not address or address.rpartition(":")[0] in LOOPBACK


def backend_config(nodes: int, address: str, gpus: int = 0) -> dict[str, Any]:
    """Flower's Ray backend config: one CPU per virtual node's actor, and the ``ray.init`` arguments.

    A local Ray gets ``nodes`` CPUs, hence ``nodes`` actors. On a cluster Flower creates one actor per
    CPU of each machine and Ray spreads them; ``num_cpus`` must not be given when joining. ``gpus``: the
    GPUs of a local Ray, shared evenly by the actors (Ray hides every GPU from an actor given none), so
    that each node's batched devices run on one (``device = "cuda"``); on a cluster actors are given none.
    """
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": True}
    share = 0.0
    if address:
        init["address"] = address
    else:
        init.update(num_cpus=nodes, _node_ip_address="127.0.0.1")
        if gpus:
            init["num_gpus"] = gpus
            share = 1.0 / math.ceil(nodes / gpus)  # a share Ray can place whole on one GPU, for every actor
    return {"client_resources": {"num_cpus": 1, "num_gpus": share}, "init_args": init}


def node_gpus(device: str) -> int:
    """The GPUs a local Ray's node actors share: those this process sees when ``device`` asks for CUDA (``auto``
    keeps a node's devices on the CPU: :func:`fedrec.server_aggregate.node_device`)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pin_node_ip(address: str) -> None:
    """Make this process's Ray use 127.0.0.1 as its node IP when the run stays on loopback, else the outward IP.

    On Linux Ray turns 127.0.0.1 (``_node_ip_address``, ``--node-ip-address``) into the machine's
    outward IP, and its servers (GCS, raylet, workers, object manager) then listen on every
    interface: anyone who reaches the machine could run code in it. Ray's only switch to a loopback
    node IP is ``ray_constants.ENABLE_RAY_CLUSTER``, read from :data:`CLUSTER_ENV` at import; it is set
    here (and in the environment, for the processes Ray starts) before ``ray.init``. When joining a
    cluster on other machines the outward IP is kept: the cluster's workers must reach this driver.
    """
    loopback = on_loopback(address)
    os.environ[CLUSTER_ENV] = "0" if loopback else "1"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = not loopback
