"""How much a lossy encoding changes a model's next-token predictions: the store's
``int8`` or ``int4``, or another 4-bit grouping (``CANDIDATES``, defined here; the store
does not offer them).

``python -m kvmesh.bench.int8_accuracy [--size bench|smollm2|tiny] [--encoding int8|int4|...]``
prints one JSON line (``bytes_at_rest``: the encoded blocks' bytes over their bf16 bytes).

For each of ``--sequences`` seeded random prompts of ``--prefix`` tokens, the model
computes the prompt's KV cache; every block of ``--block-size`` tokens of every layer is
then laid out as vLLM's CPU cache holds it (each head's K channel-major, then its V
token by token: ``cpu_block``), encoded with the store's lossy encoding (``--encoding``;
its scales per group of values of each head) and decoded, as a block written to and read back from an int8 disk
tier would be. The baseline, in the same run: the same prompt's cache unencoded. The
model then greedily continues the prompt for ``--continue`` tokens from the unencoded
cache; both caches are fed that same continuation, and at every position the
predictions are compared: top-1 agreement (the share of positions where both caches
give the same most likely token), the largest difference of the reference token's
log-probability, and the largest difference over the whole vocabulary. The control: an
unencoded copy of the cache fed the same way (its difference should be 0); the negative
control: the cache replaced by noise of the same scale (its agreement should fall far
below the encoded cache's, or the comparison could not see a damaged cache); and the
noise floor: every value moved by up to one bf16 step (what rounding alone does; an
encoding cannot be told apart from it where their agreements are this close).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform

import numpy as np

from kvmesh.kv_store.encoding import LOSSY, Int4, make_encoding


# Other 4-bit groupings, measured here and not offered by the store (bench/README.md)
CANDIDATES = {
    "int4-sym32": lambda: Int4(32, 32, asymmetric=False),  # a scale per 32 values
    "int4-asym64": lambda: Int4(64, 64, asymmetric=True),  # a scale and zero point per 64
    "int4-kivi-sym": lambda: Int4(32, 64, asymmetric=False),  # the store's groups, scales only
}


def cpu_block(k, v):
    """One block of K and V (``[kv_heads, tokens, head_dim]`` each) laid out as vLLM's
    CPU cache holds it with its ``vec`` kernels (x86 without AMX): each head's K
    channel-major (``[head_dim, tokens]``), then its V token by token."""
    import torch

    heads = k.shape[0]
    return torch.cat([k.transpose(1, 2).reshape(heads, -1), v.reshape(heads, -1)], dim=1)


def from_cpu_block(block, tokens: int, dim: int):
    """K and V back out of ``cpu_block``'s layout."""
    heads = block.shape[0]
    k = block[:, :tokens * dim].reshape(heads, dim, tokens).transpose(1, 2)
    return k, block[:, tokens * dim:].reshape(heads, tokens, dim)


def quantized_cache(cache, block_size: int, encoding: str = "int8", sizes: list | None = None):
    """A copy of ``cache`` whose K and V went through ``encoding`` block by block, each
    block laid out as the CPU cache holds it (``cpu_block``); each block's (bf16 bytes,
    encoded bytes) appended to ``sizes`` where given."""
    import torch

    enc = CANDIDATES[encoding]() if encoding in CANDIDATES else make_encoding(encoding)
    out = copy.deepcopy(cache)
    for layer in out.layers:
        k, v = layer.keys, layer.values  # [1, kv_heads, tokens, head_dim], bf16
        heads, tokens, dim = k.shape[1], k.shape[2], k.shape[3]
        for start in range(0, tokens - block_size + 1, block_size):
            block = cpu_block(k[0, :, start:start + block_size], v[0, :, start:start + block_size])
            raw = block.contiguous().view(torch.int16).numpy().tobytes()
            blob = enc.encode(raw, heads)
            if sizes is not None:
                sizes.append((len(raw), len(blob)))
            back = np.frombuffer(enc.decode(blob), np.int16).reshape(heads, -1)
            back_k, back_v = from_cpu_block(torch.from_numpy(back.copy()).view(torch.bfloat16), block_size, dim)
            k[0, :, start:start + block_size] = back_k
            v[0, :, start:start + block_size] = back_v
    return out


def jittered_cache(cache, seed: int):
    """A copy of ``cache`` with every value moved by up to one bf16 step (relative
    uniform noise of +-2**-8): the noise floor, what rounding alone does to the
    predictions."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(cache)
    for layer in out.layers:
        for t in (layer.keys, layer.values):
            noise = (torch.rand(t.shape, generator=g) - 0.5) * 2 ** -7
            t.copy_((t.float() * (1 + noise)).to(t.dtype))
    return out


def noisy_cache(cache):
    """A copy of ``cache`` with K and V replaced by noise of the same scale (the negative
    control: the predictions must then depend less on the prompt)."""
    import torch

    out = copy.deepcopy(cache)
    for layer in out.layers:
        for t in (layer.keys, layer.values):
            t.copy_(torch.randn_like(t, dtype=torch.float32).mul_(t.float().std()).to(t.dtype))
    return out


def measure(size: str, sequences: int, prefix: int, cont: int, block_size: int, seed: int,
            encoding: str = "int8") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kvmesh.cluster.models import ensure_model

    torch.manual_seed(seed)
    path = ensure_model(size)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    agree = positions = noise_agree = jitter_agree = 0
    max_ref_diff = max_any_diff = control = 0.0
    sizes: list[tuple[int, int]] = []
    with torch.inference_mode():
        for _ in range(sequences):
            ids = torch.from_numpy(rng.integers(10, vocab, size=(1, prefix)))
            first = model(ids, use_cache=True)
            cache = first.past_key_values
            encoded = quantized_cache(cache, block_size, encoding, sizes)
            nxt = int(first.logits[0, -1].argmax())
            greedy, step_cache = [], copy.deepcopy(cache)
            for _ in range(cont):  # greedy continuation from the unencoded cache
                greedy.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=step_cache, use_cache=True)
                nxt = int(out.logits[0, -1].argmax())
            feed = torch.tensor([greedy])
            ref = torch.log_softmax(model(feed, past_key_values=copy.deepcopy(cache)).logits[0].float(), -1)
            got = torch.log_softmax(model(feed, past_key_values=encoded).logits[0].float(), -1)
            same = torch.log_softmax(model(feed, past_key_values=copy.deepcopy(cache)).logits[0].float(), -1)
            control = max(control, float((ref - same).abs().max()))  # an unencoded copy: 0
            noise = torch.log_softmax(model(feed, past_key_values=noisy_cache(cache)).logits[0].float(), -1)
            top = ref.argmax(-1)
            noise_agree += int((noise.argmax(-1) == top).sum())
            jitter = torch.log_softmax(model(feed, past_key_values=jittered_cache(cache, seed)).logits[0].float(), -1)
            jitter_agree += int((jitter.argmax(-1) == top).sum())
            agree += int((got.argmax(-1) == top).sum())
            positions += len(greedy)
            max_ref_diff = max(max_ref_diff, float((ref.gather(1, top[:, None]) - got.gather(1, top[:, None])).abs().max()))
            max_any_diff = max(max_any_diff, float((ref - got).abs().max()))
    cfg = model.config
    return {"bench": "int8_accuracy", "encoding": encoding,
            "bytes_at_rest": round(sum(b for _, b in sizes) / sum(a for a, _ in sizes), 4), "model": size, "layers": cfg.num_hidden_layers,
            "kv_heads": cfg.num_key_value_heads, "sequences": sequences, "prefix_tokens": prefix,
            "positions": positions, "block_size": block_size, "top1_agreement": round(agree / positions, 4),
            "max_ref_token_logprob_diff": round(max_ref_diff, 4), "max_logprob_diff": round(max_any_diff, 4),
            "control_max_logprob_diff": round(control, 6),
            "noise_top1_agreement": round(noise_agree / positions, 4),
            "one_bf16_step_top1_agreement": round(jitter_agree / positions, 4),
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "seed": seed}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvmesh.bench.int8_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "bench", "smollm2"], default="bench")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--prefix", type=int, default=256, help="prompt tokens (their KV is encoded)")
    p.add_argument("--continue", dest="cont", type=int, default=40, help="positions compared per sequence")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoding", choices=[*LOSSY, *CANDIDATES], default="int8",
                   help="the lossy encoding measured")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.size, a.sequences, a.prefix, a.cont, a.block_size, a.seed, a.encoding)))


if __name__ == "__main__":
    main()
