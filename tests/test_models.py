import hashlib

from cluster.models import is_model_dir, make_model


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
