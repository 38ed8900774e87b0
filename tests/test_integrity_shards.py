"""Issue 12, shards: the trainer trusts no shard blindly (sha256 on first read, dtypes, attributes, split,
value ranges); `seqgen verify` catches an edited manifest config; a corrupt manifest does not block a
resume; a full disk is one line; `--workers` children die with their parent; one writer per folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from seqgen import shards as fmt
from seqgen.build import build, finalize
from seqgen.cli import main as seqgen_main
from seqgen.config import SeqType
from seqgen.lock import FolderLock, LockError
from tests.procs import children, cmdline, kill_all, still_alive_after
from tests.trainkit import DATASET, SPLIT, symbolic_set
from trainer.data import BatchStream, DataError, eval_batches, open_shard_set

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def one_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return symbolic_set(tmp_path_factory.mktemp("integrity-sets"), SeqType.BURSTY, 300)  # 3 shards of 100


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    folder = tmp_path / "set"
    shutil.copytree(pristine, folder)
    return folder


def _read_all(folder: Path) -> None:
    ss = open_shard_set(folder)
    with BatchStream(ss, 50, stop_step=6) as s:
        for _ in s:
            pass


def _resign(folder: Path, i: int) -> None:
    """Update the manifest's sha256 of shard i to its current bytes (what a careful forger would do)."""
    m = json.loads((folder / "manifest.json").read_text())
    m["shards"][i]["sha256"] = fmt.file_sha256(folder / fmt.shard_file(i))
    (folder / "manifest.json").write_text(json.dumps(m))


def _rewrite(folder: Path, i: int, name: str, fn) -> None:
    path = folder / fmt.shard_file(i)
    with h5py.File(path, "r+") as f:
        data = fn(f[name][()])
        del f[name]
        f.create_dataset(name, data=data)
    _resign(folder, i)


def _flip(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    k = len(raw) // 2 if offset is None else offset
    raw[k] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---- the trainer trusts no shard blindly --------------------------------------------------------------------
def test_a_pristine_set_reads_and_each_shard_is_hashed_once(pristine):
    ss = open_shard_set(pristine)
    assert ss.verified == set()
    _read_all(pristine)
    for _ in eval_batches(ss, 64):
        pass
    assert ss.verified == {"shard-00000.h5", "shard-00001.h5", "shard-00002.h5"}


def test_a_flipped_byte_is_refused_when_the_shard_is_first_read(copy):
    _flip(copy / fmt.shard_file(1))
    ss = open_shard_set(copy)  # structure is fine ...
    with BatchStream(ss, 50) as s:
        next(s), next(s)  # ... shard 0 is fine ...
        with pytest.raises(DataError, match="shard-00001.h5 fails its sha256 check") as e:
            next(s)  # ... shard 1 is not
    assert "\n" not in str(e.value)


def test_an_edited_manifest_checksum_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="sha256"):
        _read_all(copy)


def test_swapped_shard_files_are_refused(copy):
    a, b = copy / fmt.shard_file(0), copy / fmt.shard_file(1)
    a.rename(copy / "tmp"), b.rename(a), (copy / "tmp").rename(b)
    with pytest.raises(DataError, match="swapped"):
        open_shard_set(copy)
    _resign(copy, 0), _resign(copy, 1)  # even with the manifest's checksums re-signed
    with pytest.raises(DataError, match="swapped"):
        open_shard_set(copy)


def test_an_edited_manifest_split_is_refused(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["split"]["rare"], m["split"]["holdout"] = m["split"]["holdout"] + m["split"]["rare"][5:], m["split"]["rare"][:5]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="class split"):
        open_shard_set(copy)


@pytest.mark.parametrize("name, fn, fragment", [
    ("example", lambda a: np.where(a == a[0, 0], DATASET.symbolic_size, a).astype(a.dtype), "class ids outside"),
    ("example", lambda a: (a * 0 - 1).astype(a.dtype), "class ids outside"),
    ("label", lambda a: (a + 1000).astype(a.dtype), "labels outside [0, num_labels=40)"),
    ("exemplar", lambda a: (a + 20).astype(a.dtype), "exemplar >="),
    ("is_rare", lambda a: (a + 2).astype(a.dtype), "is_rare"),
])
def test_out_of_range_values_are_refused_even_with_a_re_signed_manifest(copy, name, fn, fragment):
    _rewrite(copy, 2, name, fn)
    with pytest.raises(DataError, match="shard-00002.h5 rows 0..99") as e:
        _read_all(copy)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, dtype", [("label", np.float32), ("example", np.float64), ("example", np.int64),
                                         ("exemplar", np.int32), ("is_rare", np.bool_)])
def test_dtypes_the_format_does_not_allow_are_refused(copy, name, dtype):
    _rewrite(copy, 1, name, lambda a: a.astype(dtype))
    with pytest.raises(DataError, match=f"{name} is stored as"):
        open_shard_set(copy)


def test_trainer_fit_on_a_corrupt_shard_exits_2_with_one_line(copy, tmp_path):
    from trainer.cli import main as trainer_main

    _flip(copy / fmt.shard_file(0))
    result = CliRunner().invoke(trainer_main, [
        "fit", "--train", str(copy), "--run-dir", str(tmp_path / "run"), "--steps", "4", "--batch-size", "8",
        "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16", "--example-encoding", "embedding",
        "--no-progress"])
    assert result.exit_code == 2, result.output
    # the shard is hashed when first read, after training started (stdout: the start line); the error is one line
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fails its sha256 check" in lines[0], result.output
    assert result.stdout.startswith("device: cpu"), result.output
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))


def test_a_corrupt_evaluation_set_is_refused_before_step_1(copy, tmp_path):
    """Evaluation shards are hashed when fit opens them, not at the first evaluation (which comes after
    training has begun): one line, exit 2, and the run directory holds nothing."""
    from trainer.cli import main as trainer_main

    train = symbolic_set(tmp_path / "sets", SeqType.BURSTY, 256)
    _flip(copy / fmt.shard_file(2))
    result = CliRunner().invoke(trainer_main, [
        "fit", "--train", str(train), "--eval", str(copy), "--allow-train-eval", "--run-dir", str(tmp_path / "run"),
        "--steps", "4", "--batch-size", "8", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
        "--example-encoding", "embedding", "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "shard-00002.h5 fails its sha256 check" in lines[0], result.output
    assert not result.stdout.startswith("device:"), result.output  # refused before training started
    assert not list((tmp_path / "run").glob("*"))


# ---- seqgen verify, resume, disk, workers ---------------------------------------------------------------
def test_verify_fails_a_manifest_whose_config_was_edited(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["config"]["sequence"]["p_bursty"] = 0.5  # every other check still passes
    (copy / "manifest.json").write_text(json.dumps(m))
    result = CliRunner().invoke(seqgen_main, ["verify", str(copy)])
    assert result.exit_code == 2 and "build.json" in result.stderr and "another build" in result.stderr
    for p in [copy / fmt.BUILD_FILE, *copy.glob("shard-*.json")]:  # without build.json and sidecars ...
        p.unlink()
    result = CliRunner().invoke(seqgen_main, ["verify", str(copy)])  # ... the regenerated rows differ
    assert result.exit_code == 2 and "differs from what the manifest's config generates" in result.stderr
    assert CliRunner().invoke(seqgen_main, ["verify", str(copy.parent.parent / "nope")]).exit_code == 2


def test_a_pristine_set_still_verifies(pristine):
    result = CliRunner().invoke(seqgen_main, ["verify", str(pristine)])
    assert result.exit_code == 0, result.output


def test_a_corrupt_manifest_does_not_block_resuming_the_build(pristine, copy):
    cfg = open_shard_set(pristine).config
    before = {p.name: p.read_bytes() for p in pristine.iterdir()}
    for garbage in (b"\x00\xff garbage", b'{"shards": 5}', b"[]"):
        (copy / "manifest.json").write_bytes(garbage)
        res = build(cfg, copy, progress=False)
        assert res.built == () and res.reused == (0, 1, 2) and res.finalized
        assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_a_shard_leaves_nothing_that_looks_complete(pristine, tmp_path, monkeypatch):
    cfg = open_shard_set(pristine).config
    real = fmt.commit
    calls: list = []

    def fill_up(tmp, final):
        calls.extend([final] if str(final).endswith(".h5") else [])
        if len(calls) == 2:  # the second shard: the disk is full
            _enospc()
        return real(tmp, final)

    monkeypatch.setattr(fmt, "commit", fill_up)
    with pytest.raises(fmt.ShardError, match="disk full") as e:
        build(cfg, tmp_path / "s", progress=False)
    assert "\n" not in str(e.value)
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["build.json", "shard-00000.h5", "shard-00000.json"]  # no .tmp, no manifest, no lock
    monkeypatch.undo()
    res = build(cfg, tmp_path / "s", progress=False)  # space freed: the rerun resumes
    assert res.built == (1, 2) and res.reused == (0,)
    assert fmt.read_manifest(tmp_path / "s") == fmt.read_manifest(pristine)


def test_disk_full_while_writing_a_sidecar_is_one_line(pristine, tmp_path, monkeypatch):
    cfg = open_shard_set(pristine).config
    import seqgen.build

    real = seqgen.build.atomic_write_json

    def sidecar_fails(path, obj):
        if path.name.startswith("shard-"):
            _enospc()
        return real(path, obj)

    monkeypatch.setattr(seqgen.build, "atomic_write_json", sidecar_fails)
    one_line(CliRunner().invoke(seqgen_main, _cli_args(cfg, tmp_path / "s")), "disk full", "rerun")
    assert not (tmp_path / "s" / "manifest.json").exists()


def _cli_args(cfg, out: Path, num_seqs: int | None = None, shard_size: int | None = None) -> list[str]:
    return ["build", "--type", cfg.seq_type.value, "--example-type", "symbolic", "--symbolic-size",
            str(cfg.dataset.symbolic_size), "--n-rare-classes", str(SPLIT.n_rare_classes), "--n-common-classes",
            str(SPLIT.n_common_classes), "--n-holdout-classes", str(SPLIT.n_holdout_classes), "--num-seqs",
            str(num_seqs or cfg.num_seqs), "--shard-size", str(shard_size or cfg.shard_size), "--out", str(out),
            "--quiet"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 100 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_seqgen_build_on_a_really_full_disk_is_one_line(pristine, tiny_tmpfs, workers):
    cfg = open_shard_set(pristine).config
    out = tiny_tmpfs / "s"
    args = _cli_args(cfg, out, num_seqs=20000, shard_size=4000) + ["--workers", str(workers)]
    proc = subprocess.run([PYTHON, "-m", "seqgen", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: disk full"), proc.stderr[-2000:]
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_do_not_outlive_a_killed_parent(pristine, tmp_path):
    cfg = open_shard_set(pristine).config
    args = _cli_args(cfg, tmp_path / "s", num_seqs=50_000_000, shard_size=100_000) + ["--workers", "2"]
    parent = subprocess.Popen([PYTHON, "-m", "seqgen", *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((tmp_path / "s").glob("shard-*.json")):
            time.sleep(0.2)  # wait until the workers are really building
        workers = [k for k in children(parent.pid) if "seqgen" in cmdline(k) or "multiprocessing" in cmdline(k)]
        assert len(workers) >= 2, children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert not still_alive_after(workers, 20)
    finally:
        parent.kill()
        kill_all(workers)


# ---- one writer per shard folder -----------------------------------------------------------------------------
def _hold_lock(folder: Path, command: str, shared: bool = False) -> subprocess.Popen:
    """Another process holding `folder`'s lock until its stdin closes."""
    code = ("import sys; from seqgen.lock import FolderLock; "
            f"l = FolderLock({str(folder)!r}, {command!r}, shared={shared}).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([PYTHON, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


def test_two_builds_into_one_folder_do_not_race(pristine, tmp_path):
    cfg = open_shard_set(pristine).config
    holder = _hold_lock(tmp_path / "s", "seqgen build")
    try:
        line = one_line(CliRunner().invoke(seqgen_main, _cli_args(cfg, tmp_path / "s")), "in use by another process",
                        f"pid {holder.pid}", "`seqgen build`", "started ")
        assert "wait for it" in line
        one_line(CliRunner().invoke(seqgen_main, ["finalize", str(tmp_path / "s")]), f"pid {holder.pid}")
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock"]  # nothing written
    finally:
        _release(holder)
    assert CliRunner().invoke(seqgen_main, _cli_args(cfg, tmp_path / "s")).exit_code == 0
    assert not (tmp_path / "s" / ".lock").exists()  # removed by its last holder


def test_ranged_builds_share_the_folder_but_exclude_a_full_build(pristine, tmp_path):
    cfg = open_shard_set(pristine).config
    holder = _hold_lock(tmp_path / "s", "seqgen build --shards", shared=True)
    try:
        res = build(cfg, tmp_path / "s", shards=range(0, 2), progress=False)  # another machine's range: fine
        assert res.built == (0, 1) and not res.finalized
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            finalize(tmp_path / "s", progress=False)
    finally:
        _release(holder)
    assert finalize(tmp_path / "s", progress=False).built == (2,)


def test_a_lock_released_while_waiting_is_taken_on_the_new_file(tmp_path):
    a = FolderLock(tmp_path, "a").acquire()
    with pytest.raises(LockError):
        FolderLock(tmp_path, "b").acquire()
    a.release()
    b = FolderLock(tmp_path, "b").acquire()
    with pytest.raises(LockError, match="`b`"):
        FolderLock(tmp_path, "c").acquire()
    b.release()
    assert not (tmp_path / ".lock").exists()
