"""Data parallelism on JAX's own machinery: one `batch` mesh axis over every device of every host.

The global batch is sharded along the mesh's `batch` axis; parameters, optimizer state and the image
table are replicated. Because the model's BatchNorm averages over the vmapped batch axis inside one
jitted program, its statistics are those of the global batch, exactly as on a single device. With several
hosts (`jax.distributed.initialize()` first), each host reads only its slice of every global batch and
`jax.make_array_from_process_local_data` assembles the global array.

A vectorized group of runs (`trainer.group`) is spread over the same devices the other way: its run axis
is sharded along a `runs` axis of the same devices (`Topology.runs_sharding`), each run whole on one
device, so that its train step needs no communication between devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from seqgen.errors import UserError


RUNS = "runs"  # the mesh axis of a vectorized group's runs


class TopologyError(UserError):
    """Batch sizes or device counts that do not fit; one-line message."""


@dataclass(frozen=True)
class Topology:
    mesh: jax.sharding.Mesh
    process_index: int
    process_count: int

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def batch_sharding(self, leading: int = 0) -> NamedSharding:
        """Sharding of arrays whose axis `leading` is the global batch axis."""
        return NamedSharding(self.mesh, P(*([None] * leading), "batch"))

    def runs_sharding(self, leading: int = 0) -> NamedSharding:
        """Sharding of arrays whose axis `leading` is a vectorized group's run axis: the runs spread over the
        devices (a `runs` mesh axis of the same devices, in the same order; `trainer.group`)."""
        return NamedSharding(self.runs_mesh, P(*([None] * leading), RUNS))

    @property
    def runs_mesh(self) -> jax.sharding.Mesh:
        return jax.sharding.Mesh(self.mesh.devices, (RUNS,))

    def check_batch(self, batch_size: int, what: str = "batch size") -> None:
        if batch_size % self.num_devices:
            raise TopologyError(
                f"{what} {batch_size} is not divisible by the {self.num_devices} devices; "
                f"use a multiple of {self.num_devices} (or fewer devices via CUDA_VISIBLE_DEVICES)"
            )


def initialize(distributed: bool, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, init_timeout: int = 300, heartbeat_timeout: int = 100) -> None:
    """Join a multi-host job. On Slurm, Open MPI and TPU pods JAX finds the cluster itself; elsewhere pass
    the coordinator address (host:port of process 0), the number of processes and this process's id.

    `init_timeout`: seconds to wait for every process to join; `heartbeat_timeout`: seconds after which a
    process that stopped sending heartbeats (hung, or killed without closing its connections) counts as
    dead, and JAX's coordination service ends every other process (JAX's defaults: 300 and 100)."""
    if not distributed:
        return
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise TopologyError("--coordinator, --num-processes and --process-id go together: give all three or none")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise TopologyError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
    if coordinator is not None and process_id != 0:
        _wait_for_coordinator(coordinator, init_timeout)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TopologyError(
            f"could not join the distributed job (coordinator {coordinator or 'auto-detected'}, "
            f"{init_timeout} s to wait for every process): {first}; start every process with the same "
            "--coordinator and --num-processes and a distinct --process-id"
        ) from None


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Refuse with one line when process 0's coordinator does not accept connections within `timeout` s
    (JAX itself would abort the process with a stack trace)."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TopologyError(f"--coordinator {address!r} is not HOST:PORT (the address of process 0)")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TopologyError(
                    f"no coordinator at {address} after {timeout:g} s ({e.strerror or e}); start process 0 "
                    "with the same --coordinator (or raise --init-timeout)"
                ) from None
            time.sleep(0.5)


def make_topology(num_devices: int | None = None) -> Topology:
    devices = jax.devices()
    if num_devices is not None:
        local = jax.local_device_count()
        if not 1 <= num_devices <= local:
            raise TopologyError(f"--devices {num_devices} asked but {local} are available")
        # the first N local devices of every process (all processes are given the same N)
        devices = [d for p in range(jax.process_count())
                   for d in [x for x in devices if x.process_index == p][:num_devices]]
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    return Topology(mesh, jax.process_index(), jax.process_count())


def to_global(topo: Topology, local: dict[str, np.ndarray], leading: int = 0) -> dict[str, jax.Array]:
    """Turn this host's slice of a batch into global, batch-sharded device arrays."""
    sharding = topo.batch_sharding(leading)
    if topo.process_count == 1:
        return {k: jax.device_put(v, sharding) for k, v in local.items()}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def replicate(topo: Topology, tree: Any) -> Any:
    return jax.device_put(tree, topo.replicated())
