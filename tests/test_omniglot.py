"""Tests of seqgen.omniglot (reading, validation, cache) and seqgen.download, on tiny synthetic archives
in the official layout, plus one slow test on the real dataset when it is available."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import random
import shutil
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import seqgen.omniglot as om
from seqgen.omniglot import (
    CACHE_NAME,
    ImageTable,
    OmniglotError,
    download,
    find_sources,
    load_image_table,
    resolve_omniglot_dir,
    table_fingerprint,
)
from tests.conftest import shared_omniglot_dir

# Synthetic layout: split -> [(alphabet, character folder, global number)]; global numbers 1..5.
LAYOUT = {
    "images_background": [("Beta", "character01", 1), ("Beta", "character02", 2), ("Alpha", "character01", 3)],
    "images_evaluation": [("Gamma", "character01", 4), ("Gamma", "character02", 5)],
}
N = 5


def png_bytes(number: int, drawer: int, size: tuple[int, int] = (105, 105), mark: int = 0) -> bytes:
    """A 1-bit PNG, white, with ink at (number, drawer) and (mark, 104): identifies class and drawer."""
    im = Image.new("1", size, 1)
    im.putpixel((drawer, number), 0)  # (x, y): row = global number, column = drawer
    im.putpixel((size[0] - 1, mark), 0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def members(split: str, layout=LAYOUT, drawers=range(1, 21), mark: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for alphabet, character, number in layout[split]:
        for d in drawers:
            name = f"{split}/{alphabet}/{character}/{number:04d}_{d:02d}.png"
            out.append((name, png_bytes(number, d, mark=mark)))
    return out


def write_zip(path: Path, items: list[tuple[str, bytes]], *, shuffle: bool = True,
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    items = list(items)
    if shuffle:  # the loader must order by file name, not by archive order
        random.Random(0).shuffle(items)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return path


def write_folder(root: Path, items: list[tuple[str, bytes]]) -> None:
    for name, data in items:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


@pytest.fixture
def five_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader told to expect the synthetic archives' 5 characters (the real count is 1623)."""
    monkeypatch.setattr(om, "N_OMNIGLOT_CLASSES", 5)


@pytest.fixture
def omni(tmp_path: Path, five_characters: None) -> Path:
    d = tmp_path / "omniglot"
    d.mkdir()
    for split in LAYOUT:
        write_zip(d / f"{split}.zip", members(split))
    return d


def fingerprint(d: Path | None, cache: Path) -> str:
    return table_fingerprint(d, cache, progress=False)


def load(d: Path, cache: Path, **kw) -> ImageTable:
    return load_image_table(d, cache, progress=False, **kw)


def forbid_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a, **k):
        raise AssertionError("table was rebuilt")

    monkeypatch.setattr(om, "_build", fail)


# ---- reading ---------------------------------------------------------------------------------
def check_synthetic(t: ImageTable, mark: int = 0) -> None:
    assert t.images.shape == (N, 20, 105, 105) and t.images.dtype == np.uint8
    assert set(np.unique(t.images)) == {0, 255}
    for c in range(N):
        for d in range(20):
            ink = np.argwhere(t.images[c, d] == 0)
            assert sorted(map(tuple, ink)) == sorted([(c + 1, d + 1), (mark, 104)])
    assert t.alphabets == ("Beta", "Beta", "Alpha", "Gamma", "Gamma")
    assert t.characters == ("character01", "character02", "character01", "character01", "character02")
    assert len(t.fingerprint) == 64 and int(t.fingerprint, 16) >= 0
    assert not t.images.flags.writeable


def test_reads_zips_in_class_and_drawer_order(omni: Path, tmp_path: Path) -> None:
    t = load(omni, tmp_path / "cache")
    check_synthetic(t)


def test_reads_extracted_folders(tmp_path: Path, five_characters: None) -> None:
    d = tmp_path / "omniglot"
    for split in LAYOUT:
        write_folder(d, members(split))
    (d / "images_background" / ".DS_Store").write_bytes(b"junk")  # ignored
    t = load(d, tmp_path / "cache")
    check_synthetic(t)
    assert find_sources(d) == [d / "images_background", d / "images_evaluation"]


def test_default_insists_on_full_dataset(omni: Path, tmp_path: Path, monkeypatch) -> None:
    load(omni, tmp_path / "cache")  # cached as a table of 5 characters
    monkeypatch.setattr(om, "N_OMNIGLOT_CLASSES", 1623)  # the real count: the check applies to the cache too
    with pytest.raises(OmniglotError, match=r"found 5 characters .* expected 1623"):
        load_image_table(omni, tmp_path / "cache", progress=False)
    with pytest.raises(OmniglotError, match=r"found 5 characters .* expected 1623"):
        load_image_table(omni, tmp_path / "cache2", progress=False)  # and to a fresh build


# ---- cache -----------------------------------------------------------------------------------
def test_cache_written_atomically_and_reused(omni: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    t1 = load(omni, cache)
    assert sorted(p.name for p in cache.iterdir()) == [CACHE_NAME]  # no temporary file left
    with h5py.File(cache / CACHE_NAME, "r") as f:
        assert f["images"].shape == (N, 20, 105, 105)
        assert f.attrs["fingerprint"] == t1.fingerprint and f.attrs["format_version"] == 1
        assert str(omni.resolve()) in f.attrs["source"]
    forbid_build(monkeypatch)
    t2 = load(omni, cache)
    np.testing.assert_array_equal(t1.images, t2.images)
    assert (t2.alphabets, t2.characters, t2.fingerprint) == (t1.alphabets, t1.characters, t1.fingerprint)
    # Unchanged sources are recognised by their stat alone, without hashing them.
    monkeypatch.setattr(om, "_fingerprint", lambda *a: pytest.fail("sources hashed again"))
    assert fingerprint(omni, cache) == t1.fingerprint


def test_cache_rebuilt_when_source_changes(omni: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    t1 = load(omni, cache)
    write_zip(omni / "images_evaluation.zip", members("images_evaluation", mark=7))
    fp = fingerprint(omni, cache)  # stale cache: rebuilt here
    assert fp != t1.fingerprint
    forbid_build(monkeypatch)
    t2 = load(omni, cache)
    assert t2.fingerprint == fp
    np.testing.assert_array_equal(t2.images[:3], t1.images[:3])
    assert t2.images[3, 0, 7, 104] == 0 and t1.images[3, 0, 7, 104] == 255
    # Same bytes with a new mtime: hashed again, found equal, not rebuilt.
    st = (omni / "images_evaluation.zip").stat()
    os.utime(omni / "images_evaluation.zip", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load(omni, cache).fingerprint == fp


def test_fingerprint_independent_of_location_and_dir_resolution(omni: Path, tmp_path: Path, monkeypatch) -> None:
    other = tmp_path / "elsewhere"
    shutil.copytree(omni, other)
    fp = fingerprint(omni, tmp_path / "c1")
    assert fingerprint(other, tmp_path / "c2") == fp
    monkeypatch.setenv("OMNIGLOT_DIR", str(other))
    assert resolve_omniglot_dir(None) == other
    assert resolve_omniglot_dir(omni) == omni
    assert fingerprint(None, tmp_path / "c3") == fp
    monkeypatch.delenv("OMNIGLOT_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_omniglot_dir(None) == Path("data/omniglot")
    with pytest.raises(OmniglotError, match=r"data/omniglot does not exist"):
        find_sources(None)


# ---- validation ------------------------------------------------------------------------------
def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_directory_message(tmp_path: Path) -> None:
    with pytest.raises(OmniglotError) as e:
        load(tmp_path / "nope", tmp_path / "cache")
    msg = one_line_error(e)
    assert str(tmp_path / "nope") in msg and "seqgen download" in msg and "images_background.zip" in msg


def test_missing_archive_message(omni: Path, tmp_path: Path) -> None:
    (omni / "images_evaluation.zip").unlink()
    with pytest.raises(OmniglotError) as e:
        find_sources(omni)
    msg = one_line_error(e)
    assert msg.startswith("images_evaluation.zip not found in") and "seqgen download" in msg


def test_corrupt_zip(omni: Path, tmp_path: Path) -> None:
    (omni / "images_background.zip").write_bytes(b"this is not a zip file" * 100)
    with pytest.raises(OmniglotError, match="is not a valid zip archive") as e:
        load(omni, tmp_path / "cache")
    one_line_error(e)


def test_corrupt_member_crc(omni: Path, tmp_path: Path) -> None:
    path = write_zip(omni / "images_evaluation.zip", members("images_evaluation"), compression=zipfile.ZIP_STORED)
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + 40] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(OmniglotError, match="is corrupt") as e:
        load(omni, tmp_path / "cache")
    one_line_error(e)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: m[:-1], r"character 0005 \(Gamma/character02\) .* has 19 drawings, expected 20"),
        (lambda m: m + [("images_evaluation/Gamma/character03/0005_01.png", png_bytes(5, 1))],
         r"character 0005 appears in two folders"),
        (lambda m: m + [("images_evaluation/Gamma/character02/0005_21.png", png_bytes(5, 1))],
         r"has 21 drawings.*unexpected \[21\]"),
        (lambda m: m + [("images_evaluation/Gamma/0006_01.png", png_bytes(6, 1))], r"unexpected file"),
        (lambda m: m + [m[0]], r"duplicate file"),
        (lambda m: m[:-1] + [(m[-1][0], png_bytes(5, 20, size=(104, 105)))], r"is 104x105 pixels, expected 105x105"),
        (lambda m: m[:-1] + [(m[-1][0], b"\x89PNG broken")], r"cannot decode"),
    ],
)
def test_structure_errors(omni: Path, tmp_path: Path, edit, pattern) -> None:
    items = edit(members("images_evaluation"))
    if len({n for n, _ in items}) < len(items):  # a duplicate name inside the archive
        with pytest.warns(UserWarning, match="Duplicate name"):
            write_zip(omni / "images_evaluation.zip", items, shuffle=False)
    else:
        write_zip(omni / "images_evaluation.zip", items)
    with pytest.raises(OmniglotError, match=pattern) as e:
        load(omni, tmp_path / "cache")
    one_line_error(e)
    assert not (tmp_path / "cache" / CACHE_NAME).exists()
    with pytest.raises(OmniglotError, match=pattern):  # a fingerprint always names a valid table
        fingerprint(omni, tmp_path / "cache")


def test_numbering_errors(tmp_path: Path) -> None:
    d = tmp_path / "omniglot"
    d.mkdir()
    gap = {"images_background": [("A", "character01", 1), ("A", "character02", 3)], "images_evaluation": []}
    write_zip(d / "images_background.zip", members("images_background", gap))
    write_zip(d / "images_evaluation.zip", [])
    with pytest.raises(OmniglotError, match=r"not 0001..0002 \(missing e.g. 0002\)"):
        load(d, tmp_path / "cache")
    both = {"images_evaluation": [("B", "character01", 1)]}
    write_zip(d / "images_evaluation.zip", members("images_evaluation", both))
    with pytest.raises(OmniglotError, match=r"character 0001 is in both"):
        load(d, tmp_path / "cache")
    write_zip(d / "images_background.zip", [])
    write_zip(d / "images_evaluation.zip", [])
    with pytest.raises(OmniglotError, match=r"no character images found"):
        load(d, tmp_path / "cache")


# ---- download --------------------------------------------------------------------------------
@pytest.fixture
def served(omni: Path):
    """The fixture archives as a remote: (dir, md5s)."""
    md5s = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in omni.glob("*.zip")}
    return omni, md5s


@pytest.fixture
def http_url(served):
    src, _ = served
    handler = functools.partial(QuietHandler, directory=str(src))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_download_file_url(served, tmp_path: Path) -> None:
    src, md5s = served
    dest = tmp_path / "dl"
    paths = download(dest, base_url=src.as_uri(), expected_md5=md5s, progress=False)
    assert paths == [dest / "images_background.zip", dest / "images_evaluation.zip"]
    for p in paths:
        assert p.read_bytes() == (src / p.name).read_bytes()
    assert sorted(x.name for x in dest.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    # Present with the right MD5: not fetched again (the URL is now unreachable).
    assert download(dest, base_url=(tmp_path / "gone").as_uri(), expected_md5=md5s, progress=False) == paths


def test_download_http_and_load_if_missing(served, http_url: str, tmp_path: Path, monkeypatch) -> None:
    src, md5s = served
    dest = tmp_path / "fresh"
    monkeypatch.setattr(om, "download", functools.partial(download, base_url=http_url, expected_md5=md5s))
    t = load(dest, tmp_path / "cache", download_if_missing=True)
    check_synthetic(t)
    assert (dest / "images_background.zip").read_bytes() == (src / "images_background.zip").read_bytes()


def test_download_wrong_md5_leaves_nothing(served, http_url: str, tmp_path: Path) -> None:
    _, md5s = served
    bad = {**md5s, "images_evaluation.zip": "0" * 32}
    dest = tmp_path / "dl"
    with pytest.raises(OmniglotError, match=r"MD5 mismatch for .*images_evaluation.zip.*file discarded") as e:
        download(dest, base_url=http_url, expected_md5=bad, progress=False)
    one_line_error(e)
    assert sorted(x.name for x in dest.iterdir()) == ["images_background.zip"]


@pytest.mark.parametrize("where", ["http404", "file_missing"])
def test_download_unreachable(where: str, served, http_url: str, tmp_path: Path) -> None:
    _, md5s = served
    base = http_url + "nothing/" if where == "http404" else (tmp_path / "nothing").as_uri() + "/"
    dest = tmp_path / "dl"
    with pytest.raises(OmniglotError) as e:
        download(dest, base_url=base, expected_md5=md5s, progress=False)
    msg = one_line_error(e)
    assert msg.startswith(f"cannot download {base}images_background.zip")
    assert "manually from " + base in msg and str(dest) in msg
    assert list(dest.iterdir()) == []


def test_official_defaults() -> None:
    assert om.DEFAULT_BASE_URL == "https://github.com/brendenlake/omniglot/raw/master/python/"
    from seqgen.download import OFFICIAL_MD5

    assert OFFICIAL_MD5 == {
        "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
    }


# ---- the real dataset ------------------------------------------------------------------------
@pytest.mark.slow
def test_real_omniglot(omniglot_table: ImageTable, omniglot_cache_dir: Path) -> None:
    t = omniglot_table
    assert t.images.shape == (1623, 20, 105, 105) and t.images.dtype == np.uint8
    assert (t.alphabets[0], t.characters[0]) == ("Arcadian", "character01")
    assert (t.alphabets[964], t.characters[964]) == ("Angelic", "character01")
    assert len(set(t.alphabets[:964])) == 30 and len(set(t.alphabets[964:])) == 20
    ink = t.images == 0
    assert np.isin(t.images[::97], [0, 255]).all()
    assert 0.03 < ink.mean() < 0.15  # measured 0.081
    per_image = np.count_nonzero(ink.reshape(1623 * 20, -1), axis=1) / (105 * 105)
    assert per_image.min() > 0.0 and per_image.max() < 0.5  # measured 0.002 .. 0.22
    src = shared_omniglot_dir()
    start = time.perf_counter()
    again = load_image_table(src, omniglot_cache_dir, progress=False)
    assert time.perf_counter() - start < 10.0  # measured ~0.8 s (build ~4.5 s)
    assert np.array_equal(again.images, t.images)  # (assert_array_equal takes ~4 s here)
    assert (again.alphabets, again.characters, again.fingerprint) == (t.alphabets, t.characters, t.fingerprint)
    assert table_fingerprint(src, omniglot_cache_dir) == t.fingerprint
