"""trainer.runlog's evaluation store: metrics.jsonl is the one record of every evaluation, evaluations/step-N.json
is derived from it (and never read as a source), with the run's own curve (fit / watch) taking precedence
over one-off evaluations."""

from __future__ import annotations

import json

import pytest

from trainer.run import RunDir, RunError
from trainer.runlog import Evaluation, read_evaluation


def _summary(mean: float, n: int = 10) -> dict:
    return {"accuracy_closed": {"mean": mean, "ci95": [mean - 0.1, mean + 0.1], "n": n}}


def _run(tmp_path):
    """A run directory with fit's curve, a --watch and two `trainer evaluate` evaluations at step 10."""
    run = RunDir(tmp_path)
    run.append_metrics({"step": 5, "kind": "train", "window": 5, "metrics": {"loss": 1.0}})
    for e in (Evaluation(10, "icl", "fewshot_holdout", "fit", _summary(0.7, 64)),
              Evaluation(10, "other", "bursty", "watch", _summary(0.2)),
              Evaluation(10, "icl", "fewshot_holdout", "evaluate", _summary(0.1), 16),
              Evaluation(10, "iwl", "no_support_zipfian", "evaluate", _summary(0.3), 16)):
        run.record_evaluation(e)
    return run


def test_the_store_is_metrics_jsonl_alone(tmp_path):
    run = _run(tmp_path)
    got = sorted((e.set, e.source, e.metrics["accuracy_closed"]["mean"]) for e in run.evaluations())
    assert got == [("icl", "evaluate", 0.1), ("icl", "fit", 0.7), ("iwl", "evaluate", 0.3), ("other", "watch", 0.2)]
    final = run.final_evaluations(10, ["icl", "iwl", "missing"])
    assert final == {"icl": _summary(0.7, 64), "iwl": _summary(0.3)}  # fit's own wins; evaluate fills in
    assert run.evaluations(step=5) == [] and run.final_evaluations(5, ["icl"]) == {}
    # the derived step file is a view, never a source: an entry only there is not an evaluation of the run
    path = tmp_path / "evaluations" / "step-10.json"
    view = json.loads(path.read_text())
    view["sets"].append({"set": "extra", "seq_type": "bursty", "metrics": _summary(0.9), "max_seqs": 8,
                         "source": "evaluate"})
    path.write_text(json.dumps(view))
    assert "extra" not in {e.set for e in run.evaluations()}


def test_evaluate_records_once_and_derives_the_step_file(tmp_path):
    run = _run(tmp_path)
    run.record_evaluation(Evaluation(10, "iwl", "no_support_zipfian", "evaluate", _summary(0.35), 32))
    records = [r for r in run.read_metrics() if r.get("kind") == "eval"]
    assert records[-1] == {"step": 10, "kind": "eval", "source": "evaluate", "set": "iwl",
                           "seq_type": "no_support_zipfian", "metrics": _summary(0.35), "max_seqs": 32}
    view = {s["set"]: s for s in read_evaluation(tmp_path / "evaluations" / "step-10.json")["sets"]}
    # derived from the store: the latest evaluate / watch entry of each set; iwl is the new one
    assert set(view) == {"icl", "iwl", "other"} and view["iwl"]["metrics"] == _summary(0.35)
    assert view["iwl"]["max_seqs"] == 32 and view["icl"]["metrics"] == _summary(0.1)
    assert [e.metrics for e in run.evaluations(10) if e.set == "iwl"] == [_summary(0.3), _summary(0.35)]
    assert run.final_evaluations(10, ["iwl"]) == {"iwl": _summary(0.35)}
    # fit's records are not in the derived file
    run.record_evaluation(Evaluation(20, "icl", "fewshot_holdout", "fit", _summary(0.8)))
    assert not (tmp_path / "evaluations" / "step-20.json").exists()
    assert "max_seqs" not in list(run.read_metrics())[-1]


def test_a_resume_keeps_evaluate_and_watch_records_after_its_step(tmp_path):
    run = RunDir(tmp_path)
    for step, source in [(10, "fit"), (20, "fit"), (20, "watch"), (20, "evaluate")]:
        run.record_evaluation(Evaluation(step, "icl", "fewshot_holdout", source, _summary(0.5)))
    run.truncate_metrics_after(10)
    assert [(e.step, e.source) for e in run.evaluations()] == [(10, "fit"), (20, "watch"), (20, "evaluate")]


def test_an_eval_record_of_the_wrong_shape_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "kind": "eval", "set": "icl"}) + "\n")
    with pytest.raises(RunError, match="seq_type") as e:
        RunDir(tmp_path).evaluations()
    assert "\n" not in str(e.value) and "metrics.jsonl" in str(e.value)


def test_a_diverged_evaluation_is_stored_and_read_back(tmp_path):
    """A diverged model evaluates to NaN loss: the store and its derived step file keep the NaN (as the
    training records do), and the run stays readable."""
    run = RunDir(tmp_path)
    nan = {"loss": {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 8}, **_summary(0.5, 8)}
    run.record_evaluation(Evaluation(4, "icl", "fewshot_holdout", "evaluate", nan, 8))
    (got,) = run.evaluations(4)
    assert got.metrics["loss"]["mean"] != got.metrics["loss"]["mean"] and got.metrics["accuracy_closed"]["mean"] == 0.5
    view = read_evaluation(tmp_path / "evaluations" / "step-4.json")
    assert view["sets"][0]["metrics"]["accuracy_closed"]["mean"] == 0.5


def test_an_evaluation_appended_while_a_resume_rewrites_the_store_is_kept(tmp_path, monkeypatch):
    """fit --resume rewrites metrics.jsonl (dropping its own records after the checkpoint) while a
    `trainer evaluate --watch` may append to it: the append waits for the rewrite instead of being lost."""
    import threading
    import time

    run = _run(tmp_path)
    read = RunDir._records  # what the rewrite reads, holding the metrics lock
    reading = threading.Event()

    def slow_read(self):
        records = list(read(self))
        reading.set()
        time.sleep(0.5)  # the rewrite has read the file and not yet replaced it
        yield from records

    monkeypatch.setattr(RunDir, "_records", slow_read)
    rewrite = threading.Thread(target=run.truncate_metrics_after, args=(5,))
    rewrite.start()
    assert reading.wait(10)
    RunDir(tmp_path).append_metrics({"step": 10, "kind": "eval", "source": "watch", "set": "late",
                                     "seq_type": "bursty", "metrics": _summary(0.4)})
    rewrite.join()
    monkeypatch.undo()
    sets = [(e.set, e.source) for e in run.evaluations()]
    assert ("late", "watch") in sets and ("icl", "fit") not in sets  # the append kept; fit's step-10 dropped
