"""Reading shards strictly: a tar that is cut short or garbled is a ShardError naming the shard and the
sample, never a quietly shorter shard (tarfile just stops at a missing header) or a traceback.
Samples come out as webdataset groups them (`__key__`, `__url__`, one bytes entry per field);
what the fields hold is clipit/shards/codec.py's.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from clipit.errors import one_line
from clipit.shards.manifest import REBUILD, ShardError


class _EndAwareTarInfo(tarfile.TarInfo):
    """tarfile ends its iteration quietly on a missing, cut or garbled header after the first member, so a
    truncated shard reads as a shorter one. This records why the iteration ended: only the archive's
    end-of-archive block (EOFHeaderError: a block of zeros) is a proper end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.clipit_end = err
            raise


class _Hashing:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, fileobj, digest):
        self.fileobj, self.digest = fileobj, digest

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        self.digest.update(data)
        return data


def read_shard(url: str, fileobj=None) -> Iterator[dict]:
    """The samples of one shard in order, as webdataset groups them (`__key__`, `__url__`, one entry per
    field, lower-case), but strict: a tar that is cut short or garbled (also between members, where tarfile
    would just stop), a member that is no `<key>.<field>`, or a field twice in one sample raise ShardError
    naming the shard and the sample. Reads `fileobj` when given (sequentially), else opens `url`."""
    key, sample, member = None, None, None
    try:
        stream = fileobj if fileobj is not None else wds.gopen(url)
    except OSError as err:
        raise ShardError(
            f"{url}: cannot open the shard ({one_line(err)}); rerun `clipit shard build --config <config>` "
            "(it rebuilds the missing shards)"
        ) from None
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_EndAwareTarInfo) as tar:
                for info in tar:
                    member = info.name
                    if not info.isreg() or member.startswith("__"):
                        continue  # directories, links, webdataset's __meta__ members: not sample fields
                    prefix, field = base_plus_ext(member)
                    if prefix is None:
                        raise ShardError(f"{url}: member {member!r} is not <key>.<field>; {REBUILD}")
                    data = tar.extractfile(info).read()
                    if sample is None or prefix != sample["__key__"]:
                        if sample is not None:
                            yield sample
                        key, sample = prefix, {"__key__": prefix, "__url__": url}
                    field = field.lower()
                    if field in sample:
                        raise ShardError(f"{url}: sample {prefix} holds two {field} members; {REBUILD}")
                    sample[field] = data
                end = getattr(tar, "clipit_end", None)
                if not isinstance(end, tarfile.EOFHeaderError):
                    raise tarfile.ReadError(
                        f"cut short or garbled after member {member}"
                        + (f": {one_line(str(end))}" if end is not None else "")
                    )
        finally:
            if fileobj is None:
                stream.close()
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        at = f"at sample {key}" if key else "before its first sample"
        raise ShardError(
            f"{url}: not a whole tar {at} ({one_line(str(err))}); the shard is truncated or corrupt: {REBUILD}"
        ) from None
    if sample is not None:
        yield sample


def tar_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard dicts ({"url": ...}, as webdataset's shard lists yield) -> samples, read
    strictly (`read_shard`); the stand-in for wds.tarfile_to_samples, whose default handler lets a
    tarfile/PIL exception out as a traceback and whose tar reader stops quietly at a cut."""
    for source in src:
        yield from read_shard(source["url"])


def iter_samples(urls: list[str]):
    """Raw samples in shard order (no shuffling, no splitting): for tests, validation, evaluation."""
    for url in urls:
        yield from read_shard(os.fspath(url))


def scan_shard(path: Path, on_sample: Callable[[dict, int], None]) -> tuple[str, int, ShardError | None]:
    """Read a shard once: (sha256 of all its bytes, samples read, the first problem or None). `on_sample`
    gets each sample and its position and raises ShardError for a bad one. After a problem the rest of
    the file is still hashed, so the caller can tell a shard that differs from its manifest (checksum)
    from one whose listed bytes are bad (a re-hashed manifest)."""
    digest = hashlib.sha256()
    count, problem = 0, None
    with open(path, "rb") as fh:
        reader = _Hashing(fh, digest)
        samples = read_shard(os.fspath(path), reader)
        try:
            for position, sample in enumerate(samples):
                on_sample(sample, position)
                count += 1
        except ShardError as err:
            problem = err
        finally:
            samples.close()
        while reader.read(1 << 20):
            pass
    return digest.hexdigest(), count, problem
