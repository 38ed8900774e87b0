"""Omniglot ingestion: official archives or folders -> one cached uint8 image table.

Source layout (Lake et al. 2015, https://github.com/brendenlake/omniglot): in one directory, for each
split `images_background` and `images_evaluation`, either the archive `<split>.zip` (preferred when both
exist) or the extracted folder `<split>/`, holding `<split>/<Alphabet>/characterNN/<PPPP>_<DD>.png`
with PPPP the global character number (0001-1623) and DD the drawer (01-20). The directory is the
explicit argument, else `$OMNIGLOT_DIR`, else `data/omniglot` (relative to the working directory).

Image table: `images` uint8 `[1623, 20, 105, 105]`; class index = global character number - 1
(background 0-963, evaluation 964-1622); drawings in file-name order; pixels as in the 1-bit PNGs
converted to "L" (white background 255, ink 0). Alphabet and character folder names are kept per class.
Local sources are checked for STRUCTURE (names, counts, sizes), not MD5: only `download` checks MD5.

Cache: `<cache_dir>/image-table-v1.h5` (datasets `images` (gzip), `alphabet`, `character`; attributes
`fingerprint`, `format_version`, `source`, `source_stat`), written atomically. `fingerprint` is the
sha256 over the sources (per split: archive bytes, or for a folder its sorted relative .png paths and
bytes). To keep repeated calls cheap (~1 ms instead of hashing 15 MB), `source_stat` records the
sources' absolute paths, sizes, mtimes and ctimes: while those are unchanged the stored fingerprint is
trusted; otherwise the sources are hashed again and the table is rebuilt only when the hash differs.
A fingerprint identifies source bytes: the same images as archive vs folder give different fingerprints.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from seqgen.atomic import commit
from seqgen.config import IMAGE_SIZE, N_EXEMPLARS, N_OMNIGLOT_CLASSES
from seqgen.download import ARCHIVES, DEFAULT_BASE_URL, OmniglotError, download

__all__ = [
    "DEFAULT_BASE_URL", "ImageTable", "OmniglotError", "download", "find_sources",
    "load_image_table", "resolve_omniglot_dir", "table_fingerprint",
]

SPLITS = tuple(a.removesuffix(".zip") for a in ARCHIVES)  # ("images_background", "images_evaluation")
FORMAT_VERSION = 1
CACHE_NAME = f"image-table-v{FORMAT_VERSION}.h5"
ENV_VAR = "OMNIGLOT_DIR"
DEFAULT_DIR = Path("data/omniglot")
_FILE_RE = re.compile(r"(\d{4})_(\d{2})\.png")
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


@dataclass(frozen=True, eq=False)
class ImageTable:
    """The whole dataset in memory: `images[c, d]` is drawing `d` of class `c` (read-only array)."""

    images: np.ndarray  # uint8 [n_classes, 20, 105, 105]
    alphabets: tuple[str, ...]  # per class, e.g. "Arcadian"
    characters: tuple[str, ...]  # per class, e.g. "character01"
    fingerprint: str  # sha256 hex of the sources

    @property
    def n_classes(self) -> int:
        return int(self.images.shape[0])


# ---- locating sources ------------------------------------------------------------------------
def resolve_omniglot_dir(omniglot_dir: str | os.PathLike[str] | None) -> Path:
    """The explicit directory, else `$OMNIGLOT_DIR`, else `data/omniglot` (relative to the cwd)."""
    if omniglot_dir is not None and str(omniglot_dir) != "":
        return Path(omniglot_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_DIR


def _how_to_fix(d: Path) -> str:
    return (
        f"put {' and '.join(ARCHIVES)} (or their extracted folders) in {d}, point --omniglot or "
        f"{ENV_VAR} at them, or run `seqgen download`"
    )


def _split_source(d: Path, split: str) -> Path | None:
    archive, folder = d / f"{split}.zip", d / split
    if archive.is_file():
        return archive
    return folder if folder.is_dir() else None


def find_sources(omniglot_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The two sources (archive or folder per split, background first); OmniglotError when absent."""
    d = resolve_omniglot_dir(omniglot_dir)
    if not d.is_dir():
        raise OmniglotError(f"Omniglot directory {d} does not exist; {_how_to_fix(d)}")
    found = {s: _split_source(d, s) for s in SPLITS}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        what = " and ".join(f"{s}.zip" for s in missing)
        raise OmniglotError(f"{what} not found in {d}; {_how_to_fix(d)}")
    return [p for p in found.values() if p is not None]


def _missing_splits(d: Path) -> list[str]:
    return [s for s in SPLITS if not d.is_dir() or _split_source(d, s) is None]


# ---- reading members -------------------------------------------------------------------------
def _folder_pngs(folder: Path) -> list[str]:
    """Sorted relative paths (`<split>/...`, forward slashes) of the .png files under `folder`."""
    rel: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__MACOSX"]
        for f in files:
            if f.endswith(".png") and not f.startswith("."):
                rel.append(Path(root, f).relative_to(folder.parent).as_posix())
    return sorted(rel)


def _zip_pngs(zf: zipfile.ZipFile) -> list[str]:
    return [
        n for n in zf.namelist()
        if n.endswith(".png") and not n.startswith("__MACOSX/") and not n.rsplit("/", 1)[-1].startswith(".")
    ]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except _CORRUPT as e:
        raise OmniglotError(f"{path} is not a valid zip archive ({e}); delete it and download it again") from None


@dataclass(frozen=True)
class _Class:
    alphabet: str
    character: str
    members: tuple[str, ...]  # 20 member names, drawer order


def _parse_layout(split: str, names: list[str], where: Path) -> dict[int, _Class]:
    """Global character number -> its folder names and drawer files; OmniglotError on any mismatch."""
    found: dict[int, dict[int, str]] = {}
    folders: dict[int, tuple[str, str]] = {}
    for name in names:
        parts = name.split("/")
        m = _FILE_RE.fullmatch(parts[-1])
        if len(parts) != 4 or parts[0] != split or m is None:
            raise OmniglotError(
                f"unexpected file {name} in {where}; expected {split}/<Alphabet>/characterNN/PPPP_DD.png"
            )
        number, drawer = int(m.group(1)), int(m.group(2))
        folder = (parts[1], parts[2])
        if folders.setdefault(number, folder) != folder:
            raise OmniglotError(
                f"character {number:04d} appears in two folders ({'/'.join(folders[number])} and "
                f"{'/'.join(folder)}) in {where}; re-extract or re-download the archive"
            )
        drawers = found.setdefault(number, {})
        if drawer in drawers:
            raise OmniglotError(f"duplicate file {name} in {where}; re-extract or re-download the archive")
        drawers[drawer] = name
    classes: dict[int, _Class] = {}
    for number, drawers in found.items():
        if sorted(drawers) != list(range(1, N_EXEMPLARS + 1)):
            missing = sorted(set(range(1, N_EXEMPLARS + 1)) - set(drawers))
            extra = sorted(set(drawers) - set(range(1, N_EXEMPLARS + 1)))
            raise OmniglotError(
                f"character {number:04d} ({'/'.join(folders[number])}) in {where} has {len(drawers)} "
                f"drawings, expected {N_EXEMPLARS} (missing drawers {missing}, unexpected {extra}); "
                "re-extract or re-download the archive"
            )
        alphabet, character = folders[number]
        classes[number] = _Class(alphabet, character, tuple(drawers[k] for k in sorted(drawers)))
    return classes


class _Reader:
    """Reads member bytes from an archive or a folder source."""

    def __init__(self, source: Path):
        self.source = source
        self.zf = _open_zip(source) if source.suffix == ".zip" else None

    def names(self) -> list[str]:
        return _zip_pngs(self.zf) if self.zf is not None else _folder_pngs(self.source)

    def read(self, name: str) -> bytes:
        if self.zf is None:
            return (self.source.parent / name).read_bytes()
        try:
            return self.zf.read(name)
        except _CORRUPT as e:
            raise OmniglotError(
                f"{self.source} is corrupt ({name}: {e}); delete it and download it again"
            ) from None

    def close(self) -> None:
        if self.zf is not None:
            self.zf.close()


def _decode(data: bytes, name: str, where: Path) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            pixels = np.asarray(im.convert("L"))
    except (OSError, SyntaxError, ValueError) as e:
        raise OmniglotError(f"cannot decode {name} in {where} ({e}); re-extract or re-download it") from None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise OmniglotError(
            f"{name} in {where} is {size[0]}x{size[1]} pixels, expected {IMAGE_SIZE}x{IMAGE_SIZE}; "
            "this is not the official Omniglot release"
        )
    return pixels


# ---- fingerprints ----------------------------------------------------------------------------
def _sha256_source(source: Path) -> str:
    h = hashlib.sha256()
    if source.is_file():
        with source.open("rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    else:
        for rel in _folder_pngs(source):
            data = (source.parent / rel).read_bytes()
            h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def _fingerprint(sources: list[Path]) -> str:
    lines = "".join(f"{s.name}\t{_sha256_source(s)}\n" for s in sources)
    return hashlib.sha256(lines.encode()).hexdigest()


def _stat_key(sources: list[Path]) -> str:
    """Digest of absolute paths, sizes, mtimes and ctimes of the sources (each .png of a folder source)."""
    h = hashlib.sha256()
    for s in sources:
        files = [s] if s.is_file() else [s.parent / r for r in _folder_pngs(s)]
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


# ---- building and caching --------------------------------------------------------------------
def _build(sources: list[Path], progress: bool) -> tuple[np.ndarray, list[str], list[str]]:
    expected_classes = N_OMNIGLOT_CLASSES
    readers = [_Reader(s) for s in sources]
    try:
        layouts = [_parse_layout(split, r.names(), r.source) for split, r in zip(SPLITS, readers)]
        numbers: dict[int, int] = {}  # global number -> index of the source holding it
        for i, layout in enumerate(layouts):
            for number in layout:
                if number in numbers:
                    raise OmniglotError(
                        f"character {number:04d} is in both {sources[numbers[number]]} and {sources[i]}; "
                        "re-download the archives"
                    )
                numbers[number] = i
        n = len(numbers)
        if n == 0:
            raise OmniglotError(f"no character images found in {sources[0].parent}; {_how_to_fix(sources[0].parent)}")
        if sorted(numbers) != list(range(1, n + 1)):
            gaps = sorted(set(range(1, n + 1)) - set(numbers))[:5]
            raise OmniglotError(
                f"character numbers in {sources[0].parent} are not 0001..{n:04d} (missing e.g. "
                f"{', '.join(f'{g:04d}' for g in gaps)}); re-download the archives"
            )
        if n != expected_classes:
            raise OmniglotError(
                f"found {n} characters in {sources[0].parent}, expected {expected_classes}; "
                "the archives are incomplete: re-download them (`seqgen download`)"
            )
        images = np.empty((n, N_EXEMPLARS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        alphabets, characters = [""] * n, [""] * n
        with tqdm(total=n * N_EXEMPLARS, desc="decoding Omniglot", unit="img",
                  disable=None if progress else True) as bar:
            for reader, layout in zip(readers, layouts):
                for number, cls in layout.items():
                    c = number - 1
                    alphabets[c], characters[c] = cls.alphabet, cls.character
                    for d, name in enumerate(cls.members):
                        images[c, d] = _decode(reader.read(name), name, reader.source)
                    bar.update(N_EXEMPLARS)
        return images, alphabets, characters
    finally:
        for r in readers:
            r.close()


def _write_cache(path: Path, images: np.ndarray, alphabets: list[str], characters: list[str],
                 fingerprint: str, source: str, stat_key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".h5.tmp", dir=path.parent)
    except OSError as e:
        raise OmniglotError(f"cannot write the image cache in {path.parent} ({e.strerror}); "
                            "pass a writable cache_dir") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary shared file
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]), compression="gzip")
            f.create_dataset("alphabet", data=alphabets, dtype=h5py.string_dtype())
            f.create_dataset("character", data=characters, dtype=h5py.string_dtype())
            f.attrs.update(fingerprint=fingerprint, format_version=FORMAT_VERSION, source=source,
                           source_stat=stat_key)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _cache_attrs(path: Path) -> dict[str, object] | None:
    """The cache file's attributes, or None when absent, unreadable or of another format."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            ok = {"images", "alphabet", "character"} <= set(f.keys())
    except (OSError, KeyError):
        return None
    if not ok or attrs.get("format_version") != FORMAT_VERSION or "fingerprint" not in attrs:
        return None
    return attrs


def _read_cache(path: Path) -> ImageTable:
    with h5py.File(path, "r") as f:
        images = f["images"][...]
        alphabets = tuple(s.decode() for s in f["alphabet"][...])
        characters = tuple(s.decode() for s in f["character"][...])
        fingerprint = str(f.attrs["fingerprint"])
    images.setflags(write=False)
    return ImageTable(images, alphabets, characters, fingerprint)


def _current_fingerprint(sources: list[Path], cache: Path) -> tuple[str, str, bool]:
    """(fingerprint, stat key, cache matches) with the stat shortcut described in the module doc."""
    stat_key = _stat_key(sources)
    attrs = _cache_attrs(cache)
    if attrs is not None and attrs.get("source_stat") == stat_key:
        return str(attrs["fingerprint"]), stat_key, True
    fp = _fingerprint(sources)
    matches = attrs is not None and attrs["fingerprint"] == fp
    if matches:  # same bytes, new mtimes (e.g. copied): refresh the shortcut, best effort
        try:
            with h5py.File(cache, "r+") as f:
                f.attrs["source_stat"] = stat_key
        except OSError:
            pass
    return fp, stat_key, matches


def table_fingerprint(
    omniglot_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "data/cache",
    *,
    progress: bool = True,
) -> str:
    """The fingerprint `load_image_table` reports: ~1 ms when the cache is current (attributes only);
    otherwise the table is built, validated and cached first, so a fingerprint always names a valid table."""
    sources = find_sources(omniglot_dir)
    fp, _, current = _current_fingerprint(sources, Path(cache_dir) / CACHE_NAME)
    if current:
        return fp
    return load_image_table(omniglot_dir, cache_dir, progress=progress).fingerprint


def load_image_table(
    omniglot_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] = "data/cache",
    *,
    download_if_missing: bool = False,
    progress: bool = True,
) -> ImageTable:
    """The image table, from the cache when it matches the sources, else built and cached: 1623
    characters (`N_OMNIGLOT_CLASSES`, read at call time) numbered 0001..1623, each with 20 drawings."""
    expected_classes = N_OMNIGLOT_CLASSES
    d = resolve_omniglot_dir(omniglot_dir)
    missing = _missing_splits(d)
    if download_if_missing and missing:
        download(d, progress=progress, names=[f"{s}.zip" for s in missing])
    sources = find_sources(d)
    cache = Path(cache_dir) / CACHE_NAME
    fp, stat_key, cached = _current_fingerprint(sources, cache)
    table = None
    if cached:
        try:
            table = _read_cache(cache)
        except (OSError, KeyError, ValueError):  # damaged cache file: rebuild it
            table = None
    if table is None:
        images, alphabets, characters = _build(sources, progress)
        source = json.dumps([str(s.resolve()) for s in sources])
        _write_cache(cache, images, alphabets, characters, fp, source, stat_key)
        images.setflags(write=False)
        table = ImageTable(images, tuple(alphabets), tuple(characters), fp)
    if table.n_classes != expected_classes:
        raise OmniglotError(
            f"found {table.n_classes} characters in {d}, expected {expected_classes}; "
            "the archives are incomplete: re-download them (`seqgen download`)"
        )
    return table

