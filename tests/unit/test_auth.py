"""Where the cluster secret comes from, and how a call's metadata is judged."""

import os
import stat

import pytest

from kvmesh.kv_store.auth import (
    METADATA_KEY, call_metadata, load_secret, new_secret, secret_matches, write_secret,
)
from kvmesh.kv_store.settings_base import SECRET_ENV


def test_the_file_wins_over_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    write_secret(str(path), "from-the-file\n")
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(str(path)) == "from-the-file"
    assert load_secret(None) == "from-the-environment"
    monkeypatch.setenv(SECRET_ENV, "")
    assert load_secret(None) is None


@pytest.mark.parametrize("content,why", [(b"", "empty"), (b" \n", "empty"), (b"x" * 4097, "larger"),
                                         (b"\xff\xfe", "UTF-8")])
def test_an_unusable_file_is_an_error_not_no_secret(tmp_path, content, why):
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why):
        load_secret(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        load_secret(str(tmp_path / "missing"))


def test_only_the_exact_secret_matches():
    secret = new_secret()
    assert len(secret) >= 40 and new_secret() != secret
    assert secret_matches(secret, call_metadata(secret))
    assert secret_matches(secret, [("other", "x"), *call_metadata(secret)])
    for metadata in ((), None, call_metadata(None), [(METADATA_KEY, secret[:-1])],
                     [(METADATA_KEY, secret + "x")], [(METADATA_KEY, secret.encode())],
                     [("authorization", secret)]):
        assert not secret_matches(secret, metadata)
