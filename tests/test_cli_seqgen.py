"""The `seqgen` command line: every command, option precedence, and each error path's one-line message."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from seqgen import download as dl
from seqgen import shards as fmt
from seqgen.build import OMNIGLOT_URL_ENV, pixels_of
from seqgen.cli import main
from seqgen.config import BuildConfig, SeqType

SYMBOLIC = ["--example-type", "symbolic", "--symbolic-size", "200", "--n-rare-classes", "150",
            "--n-common-classes", "20", "--n-holdout-classes", "10", "--quiet"]


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_error(result, *fragments: str) -> str:
    """The result failed with exit code 2 and exactly one `error: ...` line containing `fragments`."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


def test_build_verify_info(tmp_path: Path):
    out = tmp_path / "set"
    r = run("build", *SYMBOLIC, "--num-seqs", 1000, "--shard-size", 400, "--p-bursty", 0.75, "--out", out)
    assert r.exit_code == 0, r.output
    assert "built 3 shard(s)" in r.stdout and "complete, 1,000 bursty sequences in 3 shard(s)" in r.stdout
    r = run("verify", out)
    assert r.exit_code == 0 and "ok, 1,000 bursty sequences in 3 shard(s)" in r.stdout
    r = run("info", out)
    assert r.exit_code == 0, r.output
    assert "type         bursty" in r.stdout and "symbolic" in r.stdout and "query labels" in r.stdout
    frac = float(r.stdout.split("bursty       ")[1].split()[0])
    assert 0.7 < frac < 0.85  # p_bursty 0.75 (+ a few non-bursty sequences that repeat their query by chance)
    r = run("build", *SYMBOLIC, "--num-seqs", 1000, "--shard-size", 400, "--p-bursty", 0.75, "--out", out)
    assert r.exit_code == 0 and "built 0 shard(s), 3 already done" in r.stdout


def test_python_dash_m_entry_point_exists():
    import runpy

    with pytest.raises(SystemExit) as e:
        import sys

        argv, sys.argv = sys.argv, ["seqgen", "--help"]
        try:
            runpy.run_module("seqgen", run_name="__main__")
        finally:
            sys.argv = argv
    assert e.value.code == 0


def test_every_type_from_the_cli(tmp_path: Path):
    for t in SeqType:
        r = run("build", *SYMBOLIC, "--type", t.value, "--num-seqs", 200, "--out", tmp_path / t.value)
        assert r.exit_code == 0, (t, r.output)
        assert run("verify", tmp_path / t.value).exit_code == 0


def test_config_file_precedence(tmp_path: Path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        "[seqgen]\nnum_seqs = 300\nseed = 5\n[seqgen.sequence]\np_bursty = 0.5\nways = 3\n"
        "[seqgen.dataset]\nexample_type = 'symbolic'\nsymbolic_size = 200\n"
        "[seqgen.split]\nn_rare_classes = 150\nn_common_classes = 20\nn_holdout_classes = 10\n"
        "[trainer]\nanything = 1\n"
    )
    r = run("build", "--config", toml, "--p-bursty", 0.25, "--ways", 2, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    cfg = BuildConfig.from_dict(json.loads((tmp_path / "o" / "manifest.json").read_text())["config"])
    assert (cfg.num_seqs, cfg.seed, cfg.sequence.p_bursty, cfg.sequence.ways) == (300, 5, 0.25, 2)
    assert cfg.dataset.symbolic_size == 200 and cfg.sequence.bursty_shots == 3  # default kept


def test_default_out_folder_is_per_type(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("build", *SYMBOLIC, "--type", "fewshot_holdout", "--num-seqs", 50)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "data/shards/fewshot_holdout/manifest.json").is_file()


def test_ranges_and_finalize(tmp_path: Path):
    args = ["build", *SYMBOLIC, "--num-seqs", 800, "--shard-size", 200]
    assert run(*args, "--out", tmp_path / "one").exit_code == 0
    r = run(*args, "--out", tmp_path / "two", "--shards", "0:2")
    assert r.exit_code == 0 and "seqgen finalize" in r.stdout
    assert run(*args, "--out", tmp_path / "two", "--shards", "2:4").exit_code == 0
    assert not (tmp_path / "two/manifest.json").exists()
    one_error(run("verify", tmp_path / "two"), "no manifest.json", "seqgen finalize")
    r = run("finalize", tmp_path / "two", "--quiet")
    assert r.exit_code == 0 and "built 0 shard(s), 4 already done" in r.stdout
    for name in ("manifest.json", *(fmt.shard_file(i) for i in range(4))):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


# ---- error paths ------------------------------------------------------------------------------
def test_bad_option_combination(tmp_path: Path):
    one_error(run("build", *SYMBOLIC, "--seq-len", 4, "--out", tmp_path / "o"), "seq_len=4 < bursty_shots*ways+1 = 7")
    one_error(run("build", *SYMBOLIC, "--materialize", "--out", tmp_path / "o"), "symbolic", "--materialize")
    one_error(run("build", *SYMBOLIC, "--num-seqs", 100, "--shard-size", 50, "--shards", "1:9",
                  "--out", tmp_path / "o"), "--shards '1:9'", "2 shards")
    one_error(run("build", "--config", tmp_path / "missing.toml"), "missing.toml does not exist")
    one_error(run("build", "--seq-len", 30, "--omniglot", tmp_path / "none", "--out", tmp_path / "o"),
              "30 times", "20 exemplars")  # refused before looking for Omniglot
    assert not (tmp_path / "o").exists()
    r = run("build", "--type", "nonsense")
    assert r.exit_code == 2 and "nonsense" in r.output  # click's own usage error


def test_unwritable_out(tmp_path: Path):
    (tmp_path / "f").write_text("a file")
    one_error(run("build", *SYMBOLIC, "--num-seqs", 10, "--out", tmp_path / "f" / "sub"),
              "cannot create output folder", "--out")


def test_mismatched_config_names_overwrite(tmp_path: Path):
    out = tmp_path / "o"
    assert run("build", *SYMBOLIC, "--num-seqs", 100, "--out", out).exit_code == 0
    one_error(run("build", *SYMBOLIC, "--num-seqs", 100, "--seed", 3, "--out", out),
              "different shard set", "seed: 0 -> 3", "--overwrite")
    assert run("build", *SYMBOLIC, "--num-seqs", 100, "--seed", 3, "--out", out, "--overwrite").exit_code == 0


def test_truncated_and_corrupt_shards(tmp_path: Path):
    out = tmp_path / "o"
    assert run("build", *SYMBOLIC, "--num-seqs", 600, "--shard-size", 200, "--out", out).exit_code == 0
    shard = out / fmt.shard_file(1)
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 3])
    r = run("verify", out)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["error: shard-00001.h5: sha256 differs from the manifest (corrupt or truncated)"]
    one_error(run("info", out), "cannot read", "shard-00001.h5", "seqgen build")
    r = run("build", *SYMBOLIC, "--num-seqs", 600, "--shard-size", 200, "--out", out)
    assert r.exit_code == 0 and "built 1 shard(s), 2 already done" in r.stdout
    assert shard.read_bytes() == good and run("verify", out).exit_code == 0
    (out / "manifest.json").write_text("{broken")
    one_error(run("verify", out), "manifest", "unreadable")


def _fake_archives(src: Path) -> dict[str, str]:
    src.mkdir()
    md5 = {}
    for name in dl.ARCHIVES:
        with zipfile.ZipFile(src / name, "w") as z:
            z.writestr(f"{name[:-4]}/readme.txt", name)
        md5[name] = hashlib.md5((src / name).read_bytes()).hexdigest()
    return md5


def test_download_from_a_file_url(tmp_path: Path, monkeypatch):
    md5 = _fake_archives(tmp_path / "mirror")
    env = {OMNIGLOT_URL_ENV: (tmp_path / "mirror").as_uri() + "/"}
    dest = tmp_path / "omniglot"
    one_error(run("download", "--omniglot", dest, "--quiet", env=env), "MD5 mismatch", "manually")
    for name, value in md5.items():
        monkeypatch.setitem(dl.OFFICIAL_MD5, name, value)
    r = run("download", "--omniglot", dest, "--quiet", env=env)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dest.iterdir()) == sorted(dl.ARCHIVES)


def test_build_downloads_missing_omniglot(tmp_path: Path, monkeypatch):
    """The fake archives are not Omniglot, so the (validating) fingerprint step is stubbed out."""
    from seqgen import omniglot

    def fingerprint(d, cache_dir, progress=True):
        assert sorted(p.name for p in Path(d).iterdir()) == sorted(dl.ARCHIVES)
        return "ab" * 32

    monkeypatch.setattr(omniglot, "table_fingerprint", fingerprint)
    md5 = _fake_archives(tmp_path / "mirror")
    for name, value in md5.items():
        monkeypatch.setitem(dl.OFFICIAL_MD5, name, value)
    env = {OMNIGLOT_URL_ENV: (tmp_path / "mirror").as_uri() + "/"}
    args = ["build", "--num-seqs", 20, "--omniglot", tmp_path / "om", "--cache-dir", tmp_path / "cache",
            "--out", tmp_path / "o", "--quiet"]
    r = run(*args, env=env)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "om" / "images_background.zip").is_file()
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["image_table"]["fingerprint"] == "ab" * 32


def test_missing_omniglot_with_failing_download(tmp_path: Path):
    env = {OMNIGLOT_URL_ENV: (tmp_path / "nowhere").as_uri() + "/"}
    one_error(run("build", "--num-seqs", 20, "--omniglot", tmp_path / "om", "--out", tmp_path / "o", env=env),
              "cannot download", "images_background.zip")
    assert not (tmp_path / "o").exists()


# ---- the real Omniglot ---------------------------------------------------------------------------
@pytest.mark.slow
def test_real_omniglot_every_type_and_materialize(tmp_path: Path, omniglot_table, omniglot_cache_dir):
    from tests.conftest import shared_omniglot_dir

    src = shared_omniglot_dir()
    common = ["--omniglot", src, "--cache-dir", omniglot_cache_dir, "--quiet"]
    for t in SeqType:
        out = tmp_path / t.value
        r = run("build", "--type", t.value, "--num-seqs", 2000, "--shard-size", 1000, "--out", out, *common)
        assert r.exit_code == 0, (t, r.output)
        assert run("verify", out).exit_code == 0, t
        m = json.loads((out / "manifest.json").read_text())
        assert m["image_table"] == {"fingerprint": omniglot_table.fingerprint, "shape": [1623, 20, 105, 105]}
    images = omniglot_table.images
    for extra in ([], ["--augment", "--exemplars", "separated", "--preserve-ordering-every-n", 160]):
        out = tmp_path / ("mat" + "-".join(map(str, extra)))
        r = run("build", "--num-seqs", 30, "--shard-size", 16, "--materialize", "--out", out, *extra, *common)
        assert r.exit_code == 0, r.output
        assert run("verify", out).exit_code == 0
        with h5py.File(out / fmt.shard_file(1), "r") as f:
            ex, exm, px = f["example"][()], f["exemplar"][()], f["pixels"][()]
        assert px.shape == (14, 9, 105, 105) and px.dtype == np.uint8
        cfg = BuildConfig.from_dict(json.loads((out / "manifest.json").read_text())["config"])
        np.testing.assert_array_equal(px, pixels_of(images, cfg, ex, exm))
        if not extra:  # plain: pixel = images[class, drawing] without any transform
            np.testing.assert_array_equal(px, images[ex, exm])
        else:  # check one transformed entry against docs/shard-format.md's definition directly
            i = int(ex[0, 0])
            t, base = i % 8, i // 8
            img = images[base // 20, base % 20]
            img = img[:, ::-1] if t // 4 else img
            np.testing.assert_array_equal(px[0, 0], np.rot90(img, t % 4))
