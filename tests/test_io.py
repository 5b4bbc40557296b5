"""tdkd.io.file_sha256 against hashlib over the whole bytes."""

from __future__ import annotations

import hashlib
import os

import pytest

from tdkd.io import file_sha256


@pytest.mark.parametrize("size", [0, 1, 4096, 3 * (1 << 20) + 17])
def test_file_sha256_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path)


def test_file_sha256_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        file_sha256(tmp_path / "missing")
