"""Live tracking (`trainer.sinks`): TensorBoard event files and W&B runs mirror metrics.jsonl record for record
(read back from the files themselves: the TFRecord framing parsed here, the protobufs of tensorboardX; W&B's
offline .wandb log parsed here); `--log-to` on fit, evaluate and --watch; a failing sink warns once and
changes nothing else; `trainer export-tb` equals a live sink; `trainer plot RUN... --out` compares runs."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
import types
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_sweep_seeds import SWEEP, _write as write_sweep
from tests.trainkit import paper_like_sets, tiny_config
from trainer.cli import SINK_CHOICES, main
from trainer.fit import fit
from trainer.group import fit_group
from trainer.run import RunDir
from trainer.sinks import SINK_NAMES, TensorBoardSink, Tracking, WandbSink
from trainer.sweep import load_sweep
from trainer.sweep.execute import order_of, tracking_of

TB = Tracking(("tensorboard",))
# tensorboardX comes with the test extra; without it only the tests that need no tracker library run
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("sink-shards"), train_seqs=512)


@pytest.fixture(scope="module")
def seeds(sets, tmp_path_factory):
    """Two seeds of one setting, `runs/p/seed-0` and `runs/p/seed-1`, trained as one vectorized group with a
    live TensorBoard sink each."""
    train, icl, iwl = sets
    root = tmp_path_factory.mktemp("tracked") / "runs" / "p"
    dirs = [root / "seed-0", root / "seed-1"]
    cfgs = [tiny_config(steps=20, seed=s) for s in (0, 1)]
    fit_group(cfgs, [train, train], [[icl, iwl], [icl, iwl]], dirs, progress=False,
              tracking=[Tracking(("tensorboard",), f"p/seed-{s}") for s in (0, 1)])
    return dirs


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


# ---- reading event files back --------------------------------------------------------------------------
def read_events(path: Path) -> list:
    """The Event protobufs of one event file (TFRecord: length, masked CRC, data, masked CRC; both checked)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(payload)
        events.append(Event.FromString(payload))
        pos += 16 + n
    return events


def event_files(folder: Path, job: str | None = None) -> list[Path]:
    files = sorted(folder.glob("events.out.tfevents.*"))
    return [f for f in files if job is None or f.name.endswith(f".{job}")]


def points(files: list[Path]) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the files, in file order."""
    return [(e.step, v.tag, v.simple_value) for f in files for e in read_events(f) if e.HasField("summary")
            for v in e.summary.value]


def expected(records, sources=("fit", "watch", "evaluate")) -> list[tuple[int, str, float]]:
    """What a sink must hold for these metrics.jsonl records, written out independently of trainer.sinks (values
    as float32: TensorBoard's simple_value)."""
    out = []
    for r in records:
        if r["kind"] == "train":
            out += [(r["step"], f"train/{k}", float(np.float32(v))) for k, v in r["metrics"].items()]
        elif r["kind"] == "eval" and r.get("source", "fit") in sources:
            prefix = "evaluate" if r.get("source") == "evaluate" else "eval"
            out += [(r["step"], f"{prefix}/{r['set']}/{k}", float(np.float32(m["mean"])))
                    for k, m in r["metrics"].items()]
    return out


def records(run_dir: Path) -> list[dict]:
    return list(RunDir(run_dir).read_metrics())


# ---- TensorBoard -----------------------------------------------------------------------------------------
@needs_tb
def test_live_tensorboard_event_files_equal_metrics_jsonl(seeds):
    for run_dir in seeds:
        files = event_files(run_dir, "fit")
        assert len(files) == 1  # in the run directory itself: `--logdir runs` names it p/seed-N
        got = points(files)
        assert got == expected(records(run_dir))
        tags = {t for _, t, _ in got}
        assert {"train/loss", "train/accuracy_query"} <= tags
        assert any(t.startswith("eval/") and t.endswith("/accuracy_closed") for t in tags)
        events = read_events(files[0])
        assert events[0].file_version == "brain.Event:2"
        assert events[1].session_log.status == events[1].session_log.START and events[1].step == 0  # fresh fit


@needs_tb
def test_export_tb_equals_the_live_sink(seeds, tmp_path):
    run_dir = seeds[0]
    out = tmp_path / "exported"
    r = _run("export-tb", run_dir, "--out", out)
    assert r.exit_code == 0, r.output
    assert Path(r.output.strip()).parent == out
    assert points(event_files(out)) == points(event_files(run_dir, "fit"))
    # the default folder is the run directory: refused where a live sink already wrote
    _one_line_error(_run("export-tb", run_dir), "already holds TensorBoard event files", "--out")
    _one_line_error(_run("export-tb", tmp_path / "none"), "does not exist")


@needs_tb
def test_evaluate_and_watch_records_are_mirrored(seeds, sets):
    _, icl, iwl = sets
    run_dir = seeds[1]
    r = _run("evaluate", icl, iwl, "--run-dir", run_dir, "--step", "10", "--max-seqs", "32", "--log-to", "tensorboard")
    assert r.exit_code == 0, r.output
    r = _run("evaluate", icl, "--run-dir", run_dir, "--watch", "--poll", "0.05", "--max-seqs", "32",
             "--log-to", "tensorboard")
    assert r.exit_code == 0, r.output
    recs = records(run_dir)
    one_off = [x for x in recs if x.get("source") == "evaluate"]
    watched = [x for x in recs if x.get("source") == "watch"]
    assert len(one_off) == 2 and len(watched) == 1
    assert points(event_files(run_dir, "evaluate")) == expected(one_off)
    assert points(event_files(run_dir, "watch")) == expected(watched)
    assert all(t.startswith("evaluate/") for _, t, _ in points(event_files(run_dir, "evaluate")))
    # every file of the run together holds every record of metrics.jsonl
    assert sorted(points(event_files(run_dir))) == sorted(expected(recs))


@needs_tb
def test_a_resumed_fit_starts_its_session_after_the_checkpoint(sets, tmp_path):
    train, icl, _ = sets
    run_dir = tmp_path / "run"
    fit(tiny_config(steps=10), train, [icl], run_dir, progress=False, tracking=TB)
    fit(tiny_config(steps=20), train, [icl], run_dir, resume=True, progress=False, tracking=TB)
    first, second = event_files(run_dir, "fit")
    start = [e for e in read_events(second) if e.HasField("session_log")]
    assert [e.step for e in start] == [11]  # TensorBoard drops an earlier attempt's points from step 11 on
    assert points([first, second]) == expected(records(run_dir))


@needs_tb
def test_a_failing_sink_warns_once_and_changes_nothing(sets, tmp_path, monkeypatch, capsys):
    train, icl, _ = sets
    fit(tiny_config(steps=20), train, [icl], tmp_path / "plain", progress=False)
    capsys.readouterr()
    calls = []
    original = TensorBoardSink.write

    def full_disk(self, record):
        calls.append(record["step"])
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, record)

    def no_network(*args, **kwargs):
        raise ConnectionError("wandb.ai unreachable")

    monkeypatch.setattr(TensorBoardSink, "write", full_disk)
    monkeypatch.setattr(WandbSink, "__init__", no_network)
    if importlib.util.find_spec("wandb") is None:  # the extra is optional: a stand-in passes the import check
        monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    result = fit(tiny_config(steps=20), train, [icl], tmp_path / "tracked", progress=False,
                 tracking=Tracking(("tensorboard", "wandb")))
    assert result.step == 20 and not result.interrupted
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings  # one per sink, never one per record
    tb, = [w for w in warnings if "--log-to tensorboard" in w]
    assert "No space left on device" in tb and "trainer export-tb" in tb
    assert any("--log-to wandb" in w and "unreachable" in w for w in warnings)
    assert len(calls) == 2  # off after its failure
    assert (tmp_path / "tracked" / "metrics.jsonl").read_text() == (tmp_path / "plain" / "metrics.jsonl").read_text()


# ---- W&B ---------------------------------------------------------------------------------------------------
def wandb_history(run_dir: Path) -> tuple[list, list[dict]]:
    """(run records, history rows) of the W&B offline runs in run_dir/wandb: its .wandb files are a LevelDB-style
    log (7-byte header; records of 32 KiB blocks, each chunk with a 7-byte header: CRC, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs, rows = [], []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, chunks, part = 7, [], b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind == 1:
                chunks.append(chunk)
            elif kind == 2:
                part = chunk
            elif kind == 3:
                part += chunk
            elif kind == 4:
                chunks.append(part + chunk)
        for raw in chunks:
            rec = pb.Record.FromString(raw)
            if rec.WhichOneof("record_type") == "run":
                runs.append(rec.run)
            elif rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return runs, rows


def test_wandb_offline_run_holds_every_record(sets, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    train, icl, _ = sets
    run_dir = tmp_path / "wb"
    r = _run("fit", "--train", train, "--eval", icl, "--run-dir", run_dir, "--steps", "20", "--batch-size", "16",
             "--log-every", "5", "--eval-every", "10", "--eval-seqs", "64", "--num-layers", "1", "--num-heads", "2",
             "--emb-dim", "16", "--example-encoding", "embedding", "--no-progress", "--log-to", "wandb")
    assert r.exit_code == 0, r.output
    runs, rows = wandb_history(run_dir)
    assert [(x.display_name, x.job_type) for x in runs] == [("wb", "fit")]
    got = [(row["step"], tag, value) for row in rows for tag, value in row.items()
           if not tag.startswith("_") and tag != "step"]
    assert sorted(got) == sorted(expected_exact(records(run_dir)))  # every value, exactly (float64)
    assert [row["step"] for row in rows] == [r["step"] for r in records(run_dir)]  # a row per record, in order


def expected_exact(recs) -> list[tuple[int, str, float]]:
    """As `expected`, at full precision (W&B keeps float64)."""
    out = []
    for r in recs:
        if r["kind"] == "train":
            out += [(r["step"], f"train/{k}", v) for k, v in r["metrics"].items()]
        else:
            out += [(r["step"], f"eval/{r['set']}/{k}", m["mean"]) for k, m in r["metrics"].items()]
    return out


# ---- sweeps ----------------------------------------------------------------------------------------------
def test_sweep_runs_are_tracked_by_their_names(tmp_path):
    path = write_sweep(tmp_path, SWEEP.replace("seeds = [3, 4]", 'seeds = [3, 4]\nlog_to = ["tensorboard"]'))
    sweep = load_sweep(path)
    assert sweep.log_to == ("tensorboard",)
    spec = sweep.runs[1]
    r = SimpleNamespace(spec=spec, action=SimpleNamespace(value="train"), step=0, train_dir="t", eval_dirs=(),
                        run_dir=tmp_path / "out" / "runs" / spec.name)
    t = tracking_of(SimpleNamespace(sweep=sweep), r, ("wandb",))
    assert t == Tracking(("tensorboard", "wandb"), "p0/seed-4", f"{sweep.name}/p0")
    order = json.loads(json.dumps(order_of([r], None, "cache", [0], lambda x: t)))  # what a --jobs worker reads
    assert Tracking.from_dict(order["runs"][0]["tracking"]) == t
    bad = write_sweep(tmp_path / "bad", SWEEP.replace("seeds = [3, 4]", 'seeds = [3, 4]\nlog_to = ["mlflow"]'))
    _one_line_error(_run("sweep", bad, "--dry-run", "--out", tmp_path / "o"), "log_to must be a list of sink names")


@needs_tb
def test_a_sweep_mirrors_each_run_in_its_directory(tmp_path):
    """With 2 cores, --jobs 2: the worker processes get each run's tracking (else both in this process);
    `tensorboard --logdir <out>/runs` then shows the runs as p0/seed-3 and p1/seed-3, the sweep's names."""
    path = write_sweep(tmp_path, SWEEP.replace("seeds = [3, 4]", 'seeds = [3, 4]\nlog_to = ["tensorboard"]'))
    out = tmp_path / "out"
    r = _run("sweep", path, "--out", out, "--shards-dir", tmp_path / "shards", "--only", "p0/seed-3", "--only",
             "p1/seed-3", "--jobs", min(2, len(os.sched_getaffinity(0))), "--log-to", "tensorboard", "--no-progress")
    assert r.exit_code == 0, r.output
    for name in ("p0/seed-3", "p1/seed-3"):
        run_dir = out / "runs" / name
        assert points(event_files(run_dir, "fit")) == expected(records(run_dir))
    assert sorted(p.parent.relative_to(out / "runs").as_posix() for p in (out / "runs").rglob("events.out.*")) \
        == ["p0/seed-3", "p1/seed-3"]


# ---- plots -----------------------------------------------------------------------------------------------
@needs_tb
def test_plot_compares_runs_in_one_png(seeds, tmp_path):
    out = tmp_path / "figs" / "compare.png"
    r = _run("plot", *seeds, "--out", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    each = tmp_path / "each.png"
    assert _run("plot", *seeds, "--out", each, "--each").exit_code == 0 and each.stat().st_size > 0
    from trainer.plots import _settings, run_labels

    labels = run_labels(seeds)
    assert labels == ["p/seed-0", "p/seed-1"]  # a seed with its setting, as a sweep names it
    assert _settings(["p/seed-0", "p/seed-1", "q/seed-0"], mean=True) == {"p": [0, 1], "q/seed-0": [2]}
    _one_line_error(_run("plot", *seeds), "--out FILE.png")


# ---- error paths -----------------------------------------------------------------------------------------
def test_sink_names_and_missing_extras_are_one_line(sets, tmp_path, monkeypatch):
    assert SINK_CHOICES == SINK_NAMES
    train, icl, _ = sets
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r", "--log-to", "mlflow"),
                    "--log-to", "tensorboard", "wandb")
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if the extra were not installed
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r", "--log-to", "tensorboard"),
                    'pip install -e ".[tensorboard]"')
    assert not (tmp_path / "r").exists()  # refused before anything started
    _one_line_error(_run("evaluate", icl, "--run-dir", tmp_path / "r", "--log-to", "tensorboard"),
                    'pip install -e ".[tensorboard]"')
    _one_line_error(_run("export-tb", tmp_path / "r"), 'pip install -e ".[tensorboard]"')
    monkeypatch.setitem(sys.modules, "wandb", None)
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r", "--log-to", "wandb"),
                    'pip install -e ".[wandb]"')
