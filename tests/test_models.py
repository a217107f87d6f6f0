import hashlib

from kvmesh.cluster.models import is_model_dir, make_model


def test_generated_model_is_deterministic_and_complete(tmp_path, tiny_model):
    again = make_model(tmp_path / "again", "tiny", seed=0)
    assert is_model_dir(again)
    digest = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    from pathlib import Path
    assert digest(again) == digest(Path(tiny_model))
    assert (again / "tokenizer.json").read_text() == (Path(tiny_model) / "tokenizer.json").read_text()


def test_tokenizer_round_trips_text(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "The store keeps 1234 blocks; émigré ✓"
    assert tok.decode(tok.encode(text)) == text


def test_make_model_replaces_only_its_own_or_an_empty_directory(tmp_path, monkeypatch):
    import pytest

    from kvmesh.cluster import cli, models

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a kvmesh model"):
        make_model(work, "tiny")
    assert (work / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="not a kvmesh model"):
        cli.main(["model", "make", str(work)])
    assert (work / "keep.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_model_dir(make_model(empty, "tiny"))
    assert is_model_dir(make_model(empty, "tiny", seed=1))  # its own: replaced

    def fail(tmp, size, seed):
        (tmp / "partial").parent.mkdir(parents=True, exist_ok=True)
        (tmp / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_write_model", fail)
    with pytest.raises(OSError, match="disk full"):
        make_model(tmp_path / "new", "tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "work"]  # no half-written sibling
