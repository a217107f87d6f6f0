"""The models kvmesh makes for itself: the default real model and generated test models.

* ``smollm2`` (the default): SmolLM2-135M-Instruct, a real instruct model, converted from
  the GGUF file of a Python package (``cluster/smollm2.py``). It answers questions in
  English; the demo and ``kvmesh serve`` use it when no ``--model`` is given.
* ``tiny`` and ``bench``: a Llama-architecture model with seeded random weights and a
  byte-level BPE tokenizer trained on seeded synthetic text, for tests that need special
  shapes or noise controls (``tiny``) and for benchmarks (``bench``). Their output is
  noise, never English.
* Model families, each shaped like ``tiny`` but for what it is named after, with the same
  tokenizer as ``tiny`` (so one router serves any of them, and a prefill worker of one
  with a decode worker of another is a well-formed request that must miss):
  ``mqa`` (one KV head for all attention heads), ``mha`` (a KV head per attention head),
  ``sliding`` (a Mistral model whose every layer attends to a window of the last
  ``SLIDING_WINDOW`` tokens), ``hybrid`` (a Gemma-3 text model: windowed "local" layers
  and full-attention "global" ones) and ``draft`` (a draft model for ``tiny`` in
  speculative decoding: tiny's embeddings, first two layers, final norm and head, an
  early exit of tiny, so that its drafts agree with tiny's tokens often enough to be
  accepted, which a draft of independent random weights almost never does).

Every one is saved as a Hugging Face directory that vLLM loads. ``ensure_model`` keeps one
of each in a cache and makes it once.

Contract of the generated ones: the same size and seed always give the same tokenizer
and the same weights. Weights use ``initializer_range`` 0.15 so that the output depends on
the context (at the default init, random models repeat one token whatever they are given,
which would make output-equality tests prove nothing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvmesh.cluster.smollm2 import ModelSourceMissing  # raised here too: callers catch it from here


@dataclass(frozen=True)
class ModelSize:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    family: str = "llama"              # "llama", "mistral" or "gemma3" (``_config``)
    sliding_window: int | None = None  # tokens a windowed layer attends to
    layer_types: tuple[str, ...] | None = None  # per layer: "sliding_attention" or "full_attention"
    early_exit_of: str | None = None   # a size whose weights this one keeps its first layers of


SLIDING_WINDOW = 64  # two of the tests' 32-token blocks


SIZES = {
    # Fast enough for every test; output still depends on context.
    "tiny": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                      num_layers=4, num_heads=4, num_kv_heads=2, max_positions=4096),
    # Large enough that prefilling ~2,000 tokens costs about a second or more on a CPU.
    "bench": ModelSize(vocab_size=2048, hidden_size=768, intermediate_size=2048,
                       num_layers=8, num_heads=12, num_kv_heads=4, max_positions=8192),
    # Model families (the tokenizer of ``tiny``: same vocabulary size, same seed).
    "mqa": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                     num_layers=4, num_heads=4, num_kv_heads=1, max_positions=4096),
    "mha": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                     num_layers=4, num_heads=4, num_kv_heads=4, max_positions=4096),
    "sliding": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                         num_layers=4, num_heads=4, num_kv_heads=2, max_positions=4096,
                         family="mistral", sliding_window=SLIDING_WINDOW),
    "hybrid": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                        num_layers=4, num_heads=4, num_kv_heads=2, max_positions=4096,
                        family="gemma3", sliding_window=SLIDING_WINDOW,
                        layer_types=("sliding_attention", "full_attention") * 2),
    "draft": ModelSize(vocab_size=1024, hidden_size=128, intermediate_size=256,
                       num_layers=2, num_heads=4, num_kv_heads=2, max_positions=4096, early_exit_of="tiny"),
}

DEFAULT_MODEL = "smollm2"
MODEL_NAMES = (DEFAULT_MODEL, *SIZES)  # what make_model and ensure_model make
# The name a cluster serves each one under when no other is given.
SERVED_NAMES = {"smollm2": "smollm2-135m-instruct", **{size: f"kvmesh-{size}" for size in SIZES}}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a an of to in on for with by from at as is was are be been cache block key "
    "value token prefill decode layer head model store node router worker request "
    "prompt memory disk host transfer stream batch queue shard tensor pipeline tier "
    "hash chain prefix tenant latency throughput first second time cluster ray helm "
    "python kernel engine data quick brown fox jumps over lazy dog river mountain "
    "light dark green blue red yellow small large fast slow open close read write "
    "alpha beta gamma delta one two three four five six seven eight nine ten"
).split()


def synthetic_corpus(seed: int, num_lines: int = 4000) -> list[str]:
    """Seeded pseudo-text with words, numbers, punctuation and some code-like lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        n = rng.randint(4, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.2:
            words.insert(rng.randrange(n), str(rng.randint(0, 10_000)))
        line = " ".join(words)
        if i % 7 == 0:
            line = f"def f_{rng.randint(0, 99)}(x): return x * {rng.randint(1, 9)}  # {line}"
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ",", ";", ":"]))
    return lines


def make_tokenizer(vocab_size: int, seed: int):
    """Train a byte-level BPE tokenizer on the synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def make_model(out_dir: str | os.PathLike, size: str, seed: int = 0) -> Path:
    """Write a complete Hugging Face model directory to ``out_dir`` and return it.

    ``size`` is one of ``MODEL_NAMES``: ``smollm2`` converts the packaged real model
    (``seed`` must stay 0), ``tiny`` and ``bench`` generate one from ``seed``.

    Writes into a temporary sibling first and renames, so a crash never leaves a
    half-written directory that looks complete (the sibling is removed when writing
    fails). Replaces only an empty directory or one this function made earlier (it holds
    ``kvmesh_model.json``); any other existing path is a ``ValueError``, and left as it was.
    ``ModelSourceMissing`` when what ``smollm2`` is made from is not installed (checked
    before anything is written).
    """
    if size not in MODEL_NAMES:
        raise ValueError(f"unknown model {size!r}; choose one of {', '.join(MODEL_NAMES)}")
    if size == DEFAULT_MODEL and seed != 0:
        raise ValueError(f"the {size} model has trained weights: a seed applies only to "
                         f"the generated ones ({', '.join(SIZES)})")
    out = Path(out_dir)
    if out.exists() and not _replaceable(out):
        raise ValueError(f"{out} exists and is not a kvmesh model directory; give a new or empty one")
    if size == DEFAULT_MODEL:
        from kvmesh.cluster import smollm2

        smollm2.gguf_path()
        smollm2.check_converter()

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        _write_model(tmp, size, seed)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replaceable(path: Path) -> bool:
    """An empty directory, or one ``make_model`` wrote."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "kvmesh_model.json").is_file())


def _write_model(tmp: Path, size: str, seed: int) -> None:
    """The model's files in ``tmp``, ``kvmesh_model.json`` last."""
    if size == DEFAULT_MODEL:
        from kvmesh.cluster import smollm2

        source = smollm2.write_model(tmp)
        (tmp / "kvmesh_model.json").write_text(json.dumps({"size": size, "source": source}))
        return
    import torch
    from transformers import AutoModelForCausalLM

    spec = SIZES[size]
    tokenizer = make_tokenizer(spec.vocab_size, seed)
    torch.manual_seed(seed)
    source = SIZES[spec.early_exit_of] if spec.early_exit_of else spec
    model = AutoModelForCausalLM.from_config(_config(source, tokenizer)).to(torch.bfloat16)
    if spec.early_exit_of:  # the source model's weights (same seed), its first layers kept
        model.model.layers = model.model.layers[:spec.num_layers]
        model.config.num_hidden_layers = spec.num_layers
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvmesh_model.json").write_text(json.dumps(_stamp(size, seed)))


def _stamp(size: str, seed: int) -> dict:
    """What ``kvmesh_model.json`` says of a generated model: how it was made."""
    spec = SIZES[size]
    return {"size": size, "seed": seed, **({"early_exit_of": spec.early_exit_of} if spec.early_exit_of else {})}


def _config(spec: ModelSize, tokenizer):
    """The Hugging Face config of a generated model of ``spec``'s family."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.family == "llama":
        return LlamaConfig(**common)
    if spec.family == "mistral":  # every layer windowed
        return MistralConfig(**common, sliding_window=spec.sliding_window)
    if spec.family == "gemma3":  # windowed local layers between full-attention global ones
        head_dim = spec.hidden_size // spec.num_heads
        return Gemma3TextConfig(**common, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                                sliding_window=spec.sliding_window,
                                layer_types=list(spec.layer_types))
    raise ValueError(f"unknown model family {spec.family!r}")


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "tokenizer.json").is_file()


def default_model_dir(size: str) -> Path:
    """Where ``ensure_model`` keeps the model ``size``: ``$KVMESH_CACHE_DIR/models/...``
    (default cache: ``$XDG_CACHE_HOME/kvmesh`` or ``~/.cache/kvmesh``)."""
    if size not in MODEL_NAMES:
        raise ValueError(f"unknown model {size!r}; choose one of {', '.join(MODEL_NAMES)}")
    base = os.environ.get("KVMESH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvmesh")
    return Path(base) / "models" / (size if size == DEFAULT_MODEL else f"{size}-seed0")


def ensure_model(size: str) -> Path:
    """The cached model directory of ``size`` (one of ``MODEL_NAMES``), made on first use
    and reused afterwards.

    Guarantees: a directory at the returned path is complete (written in a temporary
    sibling, ``kvmesh_model.json`` last, then renamed into place); it is made at most once
    however many processes ask at the same time (a lock file next to it; the others wait,
    then reuse it); temporary siblings that a killed maker left behind are removed by the
    next maker. Progress of the long step goes to stderr. Raises ``ValueError`` for an
    unknown name and ``ModelSourceMissing`` when what ``smollm2`` is made from is not
    installed (the message says how to install it).
    """
    path = default_model_dir(size)
    if _complete(path, size):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock"), size):
        if _complete(path, size):  # another process made it while we waited
            return path
        for stale in path.parent.glob(path.name + ".tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        verb = "converting" if size == DEFAULT_MODEL else "generating"
        print(f"kvmesh: {verb} the {size} model into {path} (once: later runs reuse it) ...",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        make_model(path, size)
        print(f"kvmesh: the {size} model is ready ({time.monotonic() - started:.0f} s)",
              file=sys.stderr, flush=True)
    return path


def _complete(path: Path, size: str | None = None) -> bool:
    """A whole model directory; of ``size`` (a generated one, seed 0): made as it is made
    now (a cached one made otherwise by an earlier version is made again)."""
    if not (is_model_dir(path) and (path / "kvmesh_model.json").is_file()):
        return False
    if size in SIZES:
        try:
            return json.loads((path / "kvmesh_model.json").read_text()) == _stamp(size, 0)
        except ValueError:
            return False
    return True


@contextlib.contextmanager
def _locked(lock_path: Path, size: str):
    """Hold an exclusive lock on ``lock_path`` (released when the process ends, however)."""
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"kvmesh: waiting for another process that is making the {size} model ...",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model(model: str | None) -> tuple[str, str]:
    """(model directory, served name): the given directory, or the default model
    (SmolLM2-135M-Instruct, converted into the cache on first use). ``SystemExit`` with a
    clear message for a directory that is no model, or a default model that cannot be made."""
    if model is None:
        try:
            return str(ensure_model(DEFAULT_MODEL)), SERVED_NAMES[DEFAULT_MODEL]
        except ModelSourceMissing as e:
            raise SystemExit(f"kvmesh: {e}") from None
    if not is_model_dir(model):
        raise SystemExit(f"kvmesh: {model} is not a Hugging Face model directory "
                         "(no config.json and tokenizer.json); make one with `kvmesh model make DIR`")
    return str(Path(model).resolve()), Path(model).resolve().name
