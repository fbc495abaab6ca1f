from __future__ import annotations

import hashlib
import os

import pytest

from genloop.errors import ErrorKind, GenloopError
from persistence.repository import JobRepository


async def test_blob_round_trip(repo: JobRepository) -> None:
    content = os.urandom(4096) + b"\x00 trailing NUL and text"

    digest = await repo.put_blob(content)

    assert digest == hashlib.sha256(content).hexdigest()
    assert await repo.get_blob(digest) == content


async def test_put_blob_is_idempotent(repo: JobRepository) -> None:
    content = os.urandom(64)
    assert await repo.put_blob(content) == await repo.put_blob(content)


async def test_empty_blob(repo: JobRepository) -> None:
    digest = await repo.put_blob(b"")
    assert await repo.get_blob(digest) == b""


async def test_get_blobs_returns_every_requested_digest(repo: JobRepository) -> None:
    contents = [os.urandom(32) for _ in range(3)]
    digests = [await repo.put_blob(c) for c in contents]

    assert await repo.get_blobs(digests + digests[:1]) == dict(zip(digests, contents, strict=True))
    assert await repo.get_blobs([]) == {}


async def test_missing_blob_is_not_found(repo: JobRepository) -> None:
    present = await repo.put_blob(os.urandom(16))
    missing = hashlib.sha256(os.urandom(16)).hexdigest()

    for call in (repo.get_blob(missing), repo.get_blobs([present, missing])):
        with pytest.raises(GenloopError) as raised:
            await call
        assert raised.value.kind is ErrorKind.NOT_FOUND
        assert missing in raised.value.detail


async def test_put_blobs_batches_dedupes_and_keeps_order(repo):
    contents = [b"alpha", b"beta", b"alpha", b""]
    digests = await repo.put_blobs(contents)
    assert digests[0] == digests[2] and len(set(digests)) == 3
    assert await repo.get_blobs(digests) == dict(zip(digests, contents, strict=True))
    assert await repo.put_blobs(contents) == digests  # idempotent
    assert await repo.put_blobs([]) == []


async def test_store_files_writes_contents_and_the_file_list_in_one_transaction(repo):
    await repo.create_job("b-files", "p-files", "an app")
    files = [("app.py", b"print('hi')\n"), ("README.md", b""), ("copy.py", b"print('hi')\n")]

    stored = await repo.store_files("b-files", files)

    digest = hashlib.sha256(b"print('hi')\n").hexdigest()
    assert stored[0] == ("app.py", digest, 12) and stored[2] == ("copy.py", digest, 12)
    assert sorted((f.path, f.digest, f.size) for f in await repo.get_files("b-files")) == sorted(stored)
    contents = {d: c for (_, d, _), (_, c) in zip(stored, files, strict=True)}
    assert await repo.get_blobs([d for _, d, _ in stored]) == contents
    assert await repo.store_files("b-files", files[:1]) == stored[:1]  # a retry, or a smaller set: replaced
    assert [f.path for f in await repo.get_files("b-files")] == ["app.py"]


async def test_store_files_for_an_unknown_build_writes_nothing(repo):
    content = os.urandom(32)
    with pytest.raises(GenloopError) as raised:
        await repo.store_files("b-missing", [("x.bin", content)])
    assert raised.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(GenloopError):  # the blob insert rolled back with the file list
        await repo.get_blob(hashlib.sha256(content).hexdigest())
