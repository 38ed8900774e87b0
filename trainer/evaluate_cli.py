"""`trainer evaluate`: one checkpoint now, or every new checkpoint of a running fit (`--watch`).

`--watch` is the original's separate eval job (e.g. on the CPU beside a GPU training run): it polls the
run's checkpoints, evaluates each one not yet evaluated, appends the results to the run's
`metrics.jsonl` (records with `"source": "watch"`) and `evaluations/step-N.json`, and stops once the
final step of the run has been evaluated (or at Ctrl+C).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from trainer import checkpoint
from trainer.data import DataError
from trainer.runtime.distributed import Topology, TopologyError, replicate
from trainer.evaluate import evaluate_set, format_table, set_name, write_evaluation
from trainer.runtime.multihost import agree
from trainer.run import RunDir, RunError, run_lock
from trainer.session import data_record, load_state, make_session
from trainer.runtime.signals import GracefulInterrupt
from trainer.step import eval_key


def _train_path(run: RunDir, override: Any) -> str:
    path = override or run.read()["data"]["train"]["path"]
    if not Path(path, "manifest.json").is_file():
        raise DataError(f"the run's training set {path} is not there; pass --train DIR (needed for its class split)")
    return str(path)


def _evaluate_step(run: RunDir, session: Any, step: int, max_seqs: int | None, batch_size: int,
                   stop: GracefulInterrupt) -> list[tuple[str, str, dict]] | None:
    loaded = load_state(run.path, step, session.cfg, session.train.num_labels)
    record = data_record(session.train, session.evals)
    agree(session.topo, {"checkpoint step": step, "config": session.cfg.to_dict(), "max_seqs": max_seqs,
                         "batch size": batch_size, "training set": record["train"]["fingerprint"],
                         "evaluation sets": [e["fingerprint"] for e in record["eval"]]})
    state = replicate(session.topo, loaded)
    results = []
    for shard_set, eval_step in zip(session.evals, session.eval_steps()):
        summary = evaluate_set(
            eval_step, session.table, state.model, state.bn_state, shard_set, session.topo,
            max_seqs=max_seqs, batch_size=batch_size, should_stop=lambda: stop.stop_requested,
            key=eval_key(session.cfg.training.seed, step),
        )
        if summary is None:
            return None
        results.append((set_name(shard_set), shard_set.config.seq_type.value, summary))
    return results


def _open(run_dir: Any, eval_dirs: Sequence[Any], train_dir: Any, omniglot_dir: Any, cache_dir: Any,
          topo: Topology) -> tuple[RunDir, Any]:
    run = RunDir(run_dir)
    cfg = run.train_config()
    session = make_session(cfg, _train_path(run, train_dir), eval_dirs, topo,
                           omniglot_dir=omniglot_dir, cache_dir=cache_dir)
    _check_train_is_the_runs(run, session)
    return run, session


def _check_train_is_the_runs(run: RunDir, session: Any) -> None:
    """The training set given (or found) must be the one the run trained on (same manifest fingerprint), so
    that eval sets are checked against the run's own class split, not another set's."""
    from trainer.session import manifest_fingerprint

    recorded = run.read()["data"]["train"]
    if manifest_fingerprint(session.train) != recorded["fingerprint"]:
        raise RunError(f"training set {session.train.path} is not the one run {run.path} was trained on "
                       f"({recorded['path']}); pass that set (or a copy of it) as --train")


def evaluate_run(run_dir: Any, eval_dirs: Sequence[Any], *, step: int | None, train_dir: Any, max_seqs: int | None,
                 batch_size: int, omniglot_dir: Any, cache_dir: Any, topo: Topology,
                 echo: Callable[[str], None] = print,
                 interrupt: GracefulInterrupt | None = None) -> list[tuple[str, str, dict]] | None:
    """Evaluate one checkpoint; None when interrupted (nothing written)."""
    run, session = _open(run_dir, eval_dirs, train_dir, omniglot_dir, cache_dir, topo)
    if step is None:
        step = checkpoint.latest_step(run.path)
        if step is None:
            raise RunError(f"{run.path} has no complete checkpoint yet; wait for `trainer fit` to save one")
    with run_lock(run.path, "trainer evaluate", enabled=topo.is_main, folder=run.evaluations_dir):
        with (interrupt or GracefulInterrupt("stopping the evaluation; nothing is saved")) as stop:
            results = _evaluate_step(run, session, step, max_seqs, batch_size, stop)
        if results is None:
            echo("interrupted: no evaluation written")
            return None
        if topo.is_main:
            write_evaluation(run.evaluations_dir / f"step-{step}.json", step, results,
                             {"max_seqs": max_seqs, "source": "evaluate"})
    echo(format_table(step, results))
    return results


def watch_run(run_dir: Any, eval_dirs: Sequence[Any], *, poll: float, train_dir: Any, max_seqs: int | None,
              batch_size: int, omniglot_dir: Any, cache_dir: Any, topo: Topology,
              echo: Callable[[str], None] = print, max_idle_polls: int | None = None,
              interrupt: GracefulInterrupt | None = None) -> list[int]:
    """Evaluate each new checkpoint; return the steps evaluated. Ends after the run's last step (or at an
    interrupt: `interrupt.stop_requested` then tells)."""
    if topo.process_count > 1:
        raise TopologyError("--watch runs in one process (the processes would each see checkpoints appear at "
                            "different times); drop --distributed, or evaluate one --step at a time")
    run, session = _open(run_dir, eval_dirs, train_dir, omniglot_dir, cache_dir, topo)
    names = {set_name(s) for s in session.evals}
    done = {r["step"] for r in run.read_metrics()
            if r.get("source") == "watch" and r.get("set") in names}
    evaluated: list[int] = []
    idle = 0
    with run_lock(run.path, "trainer evaluate --watch", enabled=topo.is_main, folder=run.evaluations_dir), \
            (interrupt or GracefulInterrupt("stopping --watch; evaluations already written are kept")) as stop:
        while not stop.stop_requested:
            final = run.train_config().training.steps
            todo = [s for s in checkpoint.list_steps(run.path) if s not in done]
            if not todo:
                if final in done:
                    break
                idle += 1
                if max_idle_polls is not None and idle > max_idle_polls:
                    break
                _sleep(poll, stop)
                continue
            idle = 0
            step = todo[-1]  # newest first: a slow evaluator skips ahead rather than lagging behind
            try:
                results = _evaluate_step(run, session, step, max_seqs, batch_size, stop)
            except checkpoint.CheckpointError:
                done.add(step)  # deleted by checkpoint rotation while we waited: skip it
                continue
            if results is None:
                break
            if topo.is_main:
                for name, seq_type, summary in results:
                    run.append_metrics({"step": step, "kind": "eval", "source": "watch", "set": name,
                                        "seq_type": seq_type, "metrics": summary})
                write_evaluation(run.evaluations_dir / f"step-{step}.json", step, results,
                                 {"max_seqs": max_seqs, "source": "watch"})
            echo(format_table(step, results))
            done.add(step)
            done.update(s for s in todo if s < step)  # older ones are skipped for good
            evaluated.append(step)
    return evaluated


def _sleep(seconds: float, stop: GracefulInterrupt) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.stop_requested:
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


