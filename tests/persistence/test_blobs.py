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
    assert await repo.get_blobs(digests) == dict(zip(digests, contents))
    assert await repo.put_blobs(contents) == digests  # idempotent
    assert await repo.put_blobs([]) == []
