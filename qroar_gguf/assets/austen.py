"""Long English texts for perplexity runs: Jane Austen's six novels.

Source: the Debian package r-cran-janeaustenr (Project Gutenberg texts as R character vectors, one
element per line). apt reaches Debian mirrors where the Hub and Gutenberg may be out of reach, and
the package is small (~1.6 MB). Its data live in an R lazy-load database (Rdata.rdb + Rdata.rdx),
which the `rdata` library cannot open directly, so we walk the index ourselves (see `_read_lazyload_db`).
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import zlib
from collections import deque
from pathlib import Path

import rdata

from qroar_gguf.errors import QroarError
from qroar_gguf.llama_tools import run_program
from qroar_gguf.outputs import publish_folder, temporary_folder_beside
from qroar_gguf.paths import cache_dir

DEB_PACKAGE = "r-cran-janeaustenr"
# Title -> name of the R object in janeaustenr's data.
NOVELS: dict[str, str] = {
    "Sense & Sensibility": "sensesensibility",
    "Pride & Prejudice": "prideprejudice",
    "Mansfield Park": "mansfieldpark",
    "Emma": "emma",
    "Northanger Abbey": "northangerabbey",
    "Persuasion": "persuasion",
}


def list_titles() -> list[str]:
    """The six titles, in publication order of the janeaustenr package."""
    return list(NOVELS)


def _file_name(title: str) -> str:
    """Safe file name: 'Sense & Sensibility' -> 'Sense_and_Sensibility.txt'."""
    return title.replace("&", "and").replace(" ", "_") + ".txt"


def austen_text(title: str = "Emma") -> Path:
    """Path of a cached UTF-8 text (lines joined by newline) of one novel; builds all six on first use."""
    key = {t.lower(): t for t in NOVELS} | {v: t for t, v in NOVELS.items()}
    canonical = key.get(title.strip().lower())
    if canonical is None:
        raise QroarError(f"unknown Austen title {title!r}; choose one of: {', '.join(NOVELS)}")
    target = cache_dir() / "austen"
    if not all((target / _file_name(t)).is_file() for t in NOVELS):
        _build(target)
    return target / _file_name(canonical)


def _build(target: Path) -> None:
    # Download and write into temporary folders next to the target and rename: never a partial set of novels.
    with temporary_folder_beside(target, "deb") as tmp, temporary_folder_beside(target, "build") as work:
        data_dir = _fetch_package(tmp)
        novels = _read_lazyload_db(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
        for title, obj in NOVELS.items():
            if obj not in novels:
                raise QroarError(f"{DEB_PACKAGE} has no object {obj!r}; its data changed, report this")
            text = "\n".join(novels[obj]) + "\n"
            (work / _file_name(title)).write_text(text, encoding="utf-8")
        publish_folder(work, target)


def _fetch_package(tmp: Path) -> Path:
    """apt-get download + dpkg-deb -x the package into tmp; returns janeaustenr's data directory."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise QroarError(f"apt-get/dpkg-deb not found: the Austen texts come from Debian's {DEB_PACKAGE}; run on Debian/Ubuntu")

    log: deque = deque(maxlen=50)
    download = ["apt-get", "download", DEB_PACKAGE]
    status = run_program(download, log, cwd=tmp)
    if status != 0:  # usually stale or missing package lists
        run_program(["apt-get", "update"], deque(maxlen=0))
        status = run_program(download, log, cwd=tmp)
    debs = list(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
    if status != 0 or not debs:
        last = ([line.strip() for line in log if line.strip()] or ["no .deb"])[-1]
        raise QroarError(f"apt-get download {DEB_PACKAGE} failed ({last}); run 'sudo apt-get update' and retry")
    root = tmp / "root"
    log.clear()
    if run_program(["dpkg-deb", "-x", str(debs[0]), str(root)], log) != 0:
        raise QroarError(f"dpkg-deb could not unpack {debs[0].name} ({(list(log) or ['no output'])[-1]}); report this")
    found = sorted(root.rglob("janeaustenr/data/Rdata.rdb"))
    if not found:
        raise QroarError(f"{debs[0].name} has no janeaustenr/data/Rdata.rdb; its layout changed, report this")
    return found[0].parent


def _read_lazyload_db(rdx: Path, rdb: Path) -> dict[str, list[str]]:
    """Read every object of an R lazy-load database (what R's lazyLoadDBfetch does).

    The .rdx is an ordinary (gzipped) RDS file: list(variables = name -> c(offset, length),
    references, compressed). Each .rdb slice is a 4-byte big-endian uncompressed length followed by
    the compressed serialization; for compressed = 2 or 3 a type byte ('Z' zlib, '2' bzip2, 'X' xz,
    '0' stored) sits after the length.
    """
    index = rdata.read_rds(rdx)
    compressed = int(index["compressed"][0])
    blob = rdb.read_bytes()
    out: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])
        if compressed in (2, 3):
            kind, payload = chunk[4:5], chunk[5:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](payload)
        else:
            raw = zlib.decompress(chunk[4:]) if compressed else chunk[4:]
        if len(raw) != size:
            raise QroarError(f"{rdb} is damaged (object {name!r}); remove the cache and retry")
        obj = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        out[str(name)] = [str(line) for line in obj]
    return out
