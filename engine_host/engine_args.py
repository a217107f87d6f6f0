"""vLLM's engine arguments, read by vLLM's own parser, with what kvmesh must own refused.

A worker's ``engine_args`` are vLLM flags exactly as ``vllm serve`` takes them. They are
parsed by ``AsyncEngineArgs.add_cli_args`` on vLLM's ``FlexibleArgumentParser`` (so
``--max_num_seqs`` and ``-tp 2`` work as in vLLM), with kvmesh's defaults where vLLM's
don't fit a disaggregated worker (``KVMESH_DEFAULTS``; ``--help`` shows them). Flags that
conflict with what kvmesh sets are refused with the reason (``EngineArgsError``): the KV
transfer config always (the kvmesh connector is what moves KV through the store), and
vLLM's local prefix cache on prefill workers (they find cached prefixes in the store,
which replaces it), and what the connector cannot carry through the store
(``engine_host.model_support``: KV-cache groups of other kinds than attention KV, a
speculative method whose draft reads the target's hidden states, a KV-cache dtype it
does not carry). Decode workers keep vLLM's local prefix cache by default, as a plain
vLLM server does: the next turn of a conversation routed back to the same worker finds
its history there without a load (``--no-enable-prefix-caching`` turns it off; the
router learns which workers keep one from their health reports).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from kvmesh.engine_host.model_support import UnsupportedModel, check_engine_options

KVMESH_DEFAULTS = {
    "block_size": 32,             # a block is the store's unit: small blocks share more prefixes
    "enforce_eager": True,
    "enable_prefix_caching": False,  # prefill: the store is the prefix cache
    "disable_log_stats": False,     # the engine's timestamps give each request's time breakdown
    "model": None,                # vLLM's default names a hub model; kvmesh needs a local one
}
ROLE_DEFAULTS = {
    # vLLM's own default: the turn a decode worker just served stays in its paged cache
    "decode": {"enable_prefix_caching": True},
}
REFUSED = {
    "kv_transfer_config": "kvmesh sets vLLM's KV transfer config itself: its connector is what "
                          "moves KV between the engine and the store",
}
REFUSED_BY_ROLE = {
    "prefill": {
        "enable_prefix_caching": "a prefill worker finds cached prefixes in the kvmesh store, which "
                                 "replaces vLLM's local prefix cache (decode workers may keep one)",
    },
}


class EngineArgsError(ValueError):
    """Engine arguments vLLM's parser rejects, or that kvmesh must own; says which and why."""


def engine_parser(prog: str = "vLLM engine arguments", role: str | None = None):
    """vLLM's engine-argument parser with kvmesh's defaults (and ``role``'s own, for
    "prefill" or "decode"); errors raise ``EngineArgsError``."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message):  # argparse would exit the process
            raise EngineArgsError(message)

    parser = AsyncEngineArgs.add_cli_args(Parser(prog=prog, add_help=False, allow_abbrev=False))
    parser.set_defaults(**{**KVMESH_DEFAULTS, **ROLE_DEFAULTS.get(role or "", {})})
    return parser


def check_engine_args(argv: Sequence[str], role: str | None = None):
    """vLLM's parse of ``argv`` (an ``argparse.Namespace``), checked against what kvmesh
    must own; ``role`` ("prefill", "decode") adds that role's refusals. Touches no model
    files. Raises ``EngineArgsError``."""
    refused = dict(REFUSED, **REFUSED_BY_ROLE.get(role or "", {}))
    for flag in given_flags(argv):
        name = flag[2:].replace("-", "_")
        if name in refused:
            raise EngineArgsError(f"{flag} is not allowed here: {refused[name]}")
    ns = engine_parser(role=role).parse_args(list(argv))
    if ns.model is None:
        raise EngineArgsError("--model is required: a local Hugging Face model directory")
    if ns.block_size is not None and (ns.block_size <= 0 or _cpu() and ns.block_size % 32):
        raise EngineArgsError(f"--block-size must be a positive multiple of 32 on the CPU: {ns.block_size}")
    try:
        check_engine_options(ns.model, ns.kv_cache_dtype, ns.speculative_config,
                             skip_layers=ns.kv_cache_dtype_skip_layers)
    except UnsupportedModel as e:
        raise EngineArgsError(str(e)) from None
    return ns


def given_flags(argv: Sequence[str]) -> list[str]:
    """The long flags in ``argv``, as ``--dashed-names`` (vLLM also takes underscores and
    ``--flag=value``); ``--no-x`` stays itself, so it is not taken for ``--x``."""
    return [arg.partition("=")[0].replace("_", "-") for arg in argv if arg.startswith("--")]


def parse_engine_args(argv: Sequence[str], role: str | None = None):
    """vLLM ``AsyncEngineArgs`` from ``argv`` (no KV transfer config), after
    ``check_engine_args``. Raises ``EngineArgsError`` (and vLLM's own errors for a model
    it cannot find)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = AsyncEngineArgs.from_cli_args(check_engine_args(argv, role))
    if args.distributed_executor_backend is None:  # one rank: inside the engine-core process
        world = args.tensor_parallel_size * args.pipeline_parallel_size
        args.distributed_executor_backend = "uni" if world == 1 else "mp"
    return args


def changed_engine_kwargs(args) -> dict:
    """The fields of ``args`` (``AsyncEngineArgs``) that differ from vLLM's defaults, as
    keyword arguments for ``vllm.LLM``: a colocated engine with the same arguments."""
    from vllm.engine.arg_utils import EngineArgs

    defaults = EngineArgs(model=args.model)
    changed = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)
               if f.init and getattr(args, f.name) != getattr(defaults, f.name)}
    return {"model": args.model, **changed}


def _cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_help(role: str | None = None) -> str:
    """vLLM's own help for its engine arguments, with kvmesh's defaults (``role``'s)."""
    return engine_parser("vLLM engine arguments (passed through unchanged)", role).format_help()


def engine_config_summary(vllm_config) -> dict:
    """What a started engine runs with, for the worker's health reply."""
    cache, sched, par = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.parallel_config
    spec = vllm_config.speculative_config
    return {
        "model": vllm_config.model_config.model,
        "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
        "max_model_len": vllm_config.model_config.max_model_len,
        "block_size": cache.block_size,
        "num_gpu_blocks": cache.num_gpu_blocks,
        "num_gpu_blocks_override": cache.num_gpu_blocks_override,
        "kv_cache_dtype": cache.cache_dtype,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "scheduling_policy": str(sched.policy),
        "tensor_parallel_size": par.tensor_parallel_size,
        "pipeline_parallel_size": par.pipeline_parallel_size,
        "speculative_method": getattr(spec, "method", None) if spec else None,
        "quantization": vllm_config.model_config.quantization,
    }
