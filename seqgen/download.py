"""Download of the two official Omniglot archives (Lake et al. 2015) with MD5 verification.

`download(dest_dir)` fetches `images_background.zip` and `images_evaluation.zip` from the official
repository (https://github.com/brendenlake/omniglot, folder `python/`) with urllib only, shows a tqdm
progress bar, verifies each archive's MD5 while streaming and moves it into place atomically
(`<name>.part` in the same folder, fsync, `os.replace`). A failed or mismatching download leaves no
file behind. Archives already present with the expected MD5 are not fetched again.

Every failure is an `OmniglotError` with a one-line message that names the fix (download the two files
by hand from the named URL into the named folder). `base_url` and `expected_md5` are parameters so that
tests can serve fixture archives from a file:// URL or a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from seqgen.atomic import commit
from seqgen.errors import UserError

DEFAULT_BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVES = ("images_background.zip", "images_evaluation.zip")
OFFICIAL_MD5: Mapping[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
_CHUNK = 1 << 16
_TIMEOUT_S = 60.0


class OmniglotError(UserError):
    """Omniglot missing, incomplete, corrupt or not downloadable; the message is one line naming the fix."""


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _manual_hint(dest: Path, base_url: str) -> str:
    return (
        f"download {' and '.join(ARCHIVES)} manually from {base_url} and put them in {dest}"
    )


def _fetch_one(url: str, part: Path, name: str, progress: bool) -> str:
    """Stream `url` into `part`; return the MD5 hex digest. Network errors propagate."""
    h = hashlib.md5()
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with (
            part.open("wb") as out,
            tqdm(
                total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if progress else True,
            ) as bar,
        ):
            while block := response.read(_CHUNK):
                out.write(block)
                h.update(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    return h.hexdigest()


def download(
    dest_dir: str | os.PathLike[str],
    *,
    base_url: str = DEFAULT_BASE_URL,
    progress: bool = True,
    expected_md5: Mapping[str, str] = OFFICIAL_MD5,
    names: Sequence[str] = ARCHIVES,
) -> list[Path]:
    """Download the official Omniglot archives into `dest_dir`; return their paths (in `names` order).

    `expected_md5` maps archive name -> MD5 (the official values by default; tests pass their own).
    `names` restricts which archives are fetched (default: both).
    """
    dest = Path(dest_dir)
    base = base_url if base_url.endswith("/") else base_url + "/"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OmniglotError(f"cannot create {dest} ({e.strerror}); {_manual_hint(dest, base)}") from None
    paths: list[Path] = []
    for name in names:
        if name not in expected_md5:
            raise OmniglotError(f"no expected MD5 for {name}; pass it in expected_md5")
        want = expected_md5[name].lower()
        target = dest / name
        if target.is_file() and _md5_of(target) == want:
            paths.append(target)
            continue
        url = base + name
        part = dest / (name + ".part")
        try:
            got = _fetch_one(url, part, name, progress)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            part.unlink(missing_ok=True)
            if isinstance(e, urllib.error.HTTPError):
                e.close()  # it holds the open response
                reason: object = f"HTTP {e.code} {e.reason}"
            else:
                reason = getattr(e, "reason", None) or e
            raise OmniglotError(f"cannot download {url} ({reason}); {_manual_hint(dest, base)}") from None
        except OSError as e:
            part.unlink(missing_ok=True)
            raise OmniglotError(
                f"cannot download {url} into {dest} ({e.strerror or e}); {_manual_hint(dest, base)}"
            ) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        if got != want:
            part.unlink(missing_ok=True)
            raise OmniglotError(
                f"MD5 mismatch for {url}: got {got}, expected {want} (file discarded); "
                f"retry later or {_manual_hint(dest, base)}"
            )
        commit(part, target)
        paths.append(target)
    return paths
