"""Who reads which rows, and what every process of a multi-host job must agree on.

One rule decides which rows of a global batch this process reads, for training and evaluation alike:
`host_part(topo, B)` derives it from the batch sharding itself (the rows that this process's devices
hold of a `[B]` array sharded along the mesh's `batch` axis), which is exactly where
`jax.make_array_from_process_local_data` (`trainer.runtime.distributed.to_global`) puts this process's rows.
`train_stream` and `eval_split` are the only builders of host batches; `fit` (fresh or resumed) and
`trainer evaluate` call them, so they cannot disagree about the rows, on any topology: 1 process x N
devices reads whole global batches, P processes read one slice each, and the slices concatenate in
process order to the global batch.

With several processes every decision that changes the sequence of collective operations is taken
jointly: `agree` refuses (one line, on every process) a job whose processes were started with different
configs, shard sets or resume points, and doubles as the barrier before process 0 writes anything;
`any_process` turns a stop request (SIGTERM / Ctrl+C) seen by one process into a stop at the same step
boundary on all (the training loop asks it only at the steps that log, evaluate or checkpoint, so that
it is the loop's only collective and dispatches between those steps do not wait for one another). `exit_on_failure` turns any failure of one process into a one-line error and an
immediate exit of that process, which closes its collective connections so the others fail fast too
(rather than waiting for a peer that is gone).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import numpy as np

from seqgen.files import canonical_sha256
from trainer.data import BatchStream, ShardSet, eval_batches
from trainer.runtime.distributed import Topology, TopologyError
from trainer.runtime.errors import TRAINER, UserError, error_line


def host_part(topo: Topology, global_batch: int) -> tuple[int, int]:
    """(part, parts): this process reads rows [part*B/parts, (part+1)*B/parts) of every global batch of B."""
    topo.check_batch(global_batch)
    if topo.process_count == 1:
        return 0, 1
    index_map = topo.batch_sharding().addressable_devices_indices_map((global_batch,))
    spans = sorted({(ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop) for ix in index_map.values()})
    if not spans:
        raise TopologyError(f"process {topo.process_index} has no device in the mesh; use the same --devices on every process")
    lo, hi = spans[0][0], spans[-1][1]
    size = hi - lo
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or global_batch % size or lo % size:
        raise TopologyError(
            f"process {topo.process_index}'s devices do not hold one equal, contiguous slice of the batch "
            f"(rows {spans}); give every process the same number of devices"
        )
    return lo // size, global_batch // size


def train_stream(train: ShardSet, topo: Topology, batch_size: int, start_step: int) -> BatchStream:
    """This process's part of global training batches start_step, start_step + 1, ... of `batch_size` rows."""
    part, parts = host_part(topo, batch_size)
    return BatchStream(train, batch_size, start_step=start_step, process_index=part, process_count=parts)


def eval_batch_size(topo: Topology, batch_size: int) -> int:
    """The evaluation batch rounded up to a multiple of the device count."""
    return -(-batch_size // topo.num_devices) * topo.num_devices


def eval_split(shard_set: ShardSet, topo: Topology, batch_size: int, max_seqs: int | None) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of the evaluation batches (first max_seqs sequences, padded, `valid` mask)."""
    part, parts = host_part(topo, batch_size)
    return eval_batches(shard_set, batch_size, max_seqs, process_index=part, process_count=parts)


# ---- agreement between processes -------------------------------------------------------------------
def _gather(topo: Topology, local: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local))


def _digest(value: Any) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(canonical_sha256(value)), np.uint32)


def agree(topo: Topology, what: dict[str, Any]) -> None:
    """Refuse (TopologyError, one line, raised on every process) unless all processes hold the same `what`.

    A collective: every process must call it at the same point; nothing is written before it returns.
    """
    if topo.process_count == 1:
        return
    names = sorted(what)
    local = np.stack([_digest(what[n]) for n in names])  # [fields, 8]
    every = _gather(topo, local)  # [processes, fields, 8]
    for i, name in enumerate(names):
        odd = [p for p in range(every.shape[0]) if not np.array_equal(every[p, i], every[0, i])]
        if odd:
            who = ", ".join(map(str, odd))
            raise TopologyError(
                f"process {who} was started with a different {name} than process 0; start every process "
                "with the same command line (same --config, options, --resume and identical shard sets)"
            )


def any_process(topo: Topology, flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: all processes call it together)."""
    if topo.process_count == 1:
        return bool(flag)
    return bool(_gather(topo, np.asarray([int(bool(flag))], np.int32)).max())


@contextlib.contextmanager
def exit_on_failure(topo: Topology) -> Iterator[None]:
    """Several processes: any error becomes one line `error: ...` and an immediate exit (code 2).

    `os._exit` skips `jax.distributed`'s shutdown barrier, which would otherwise wait for (and then abort
    on) peers that are blocked or gone; exiting closes this process's collective connections, so a peer
    blocked in a collective fails at once with "Connection closed by peer" and exits the same way.
    """
    if topo.process_count == 1:
        yield
        return
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure must end this process cleanly
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        msg = error_line(e, TRAINER) if isinstance(e, UserError) else None
        if msg is None:
            msg = (f"process {topo.process_index} of {topo.process_count} failed ({type(e).__name__}: {first[:300]}); "
                   "if another process died first, its log says why; restart every process (with --resume)")
        sys.stdout.flush()
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
        os._exit(130 if isinstance(e, KeyboardInterrupt) else 2)
