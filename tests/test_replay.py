"""`trainer replay`: the first steps of a recorded run trained again and compared, bit for bit."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.trainkit import paper_like_sets, symbolic_set, tiny_config
from seqgen.config import SeqType
from trainer.cli import main
from trainer.fit import fit


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    train, icl, _ = paper_like_sets(root / "sets")
    fit(tiny_config(steps=20, log_every=5, eval_every=10, checkpoint_every=10), train, [icl], root / "run",
        progress=False)
    return root, train


def test_a_replay_on_the_same_machine_and_code_is_bitwise_equal(recorded):
    root, train = recorded
    before = (root / "run" / "metrics.jsonl").read_bytes()
    r = CliRunner().invoke(main, ["replay", str(root / "run"), "--train", str(train), "--steps", "10"])
    assert r.exit_code == 0, r.output
    assert "bitwise equal at every logged step through step 10" in r.output
    rows = [l.split() for l in r.output.splitlines() if l.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [5, 10] and all(row[1] == row[2] for row in rows)
    assert (root / "run" / "metrics.jsonl").read_bytes() == before  # the recorded run is left alone


def test_a_run_that_computed_differently_is_said_to_differ(recorded, tmp_path):
    root, train = recorded
    import shutil

    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    for rec in records:  # a recording whose step-10 loss differs in its last bits
        if rec.get("kind") == "train" and rec["step"] == 10:
            rec["metrics"]["loss"] = rec["metrics"]["loss"] * (1 + 1e-7) + 1e-7
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    r = CliRunner().invoke(main, ["replay", str(run), "--train", str(train), "--steps", "10"])
    assert r.exit_code == 1 and "differs from step 10 on" in r.output, r.output


def test_the_wrong_training_set_or_length_is_one_line(recorded, tmp_path):
    root, _ = recorded
    other = symbolic_set(tmp_path, SeqType.BURSTY, 512, seed=9)
    for args, needle in (([str(other), "--steps", "10"], "is not the run's training set"),
                         ([str(other), "--steps", "99"], "--steps must be between 1 and the run's 20 steps"),
                         ([str(other), "--steps", "3"], "no logged training loss at or before step 3")):
        r = CliRunner().invoke(main, ["replay", str(root / "run"), "--train", *args])
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
