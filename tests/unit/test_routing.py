"""Choosing workers: conditional disaggregation by what is cached and by how busy the
prefill workers are, and every turn's tokens credited for the next one."""

from __future__ import annotations

from kvmesh.kv_store.keys import chain_hashes
from kvmesh.router.routing import RoutingPolicy, Worker

BLOCK = 4


def policy(**options) -> RoutingPolicy:
    return RoutingPolicy(prefill=[Worker("p", None)], decode=[Worker("d1", None), Worker("d2", None)],
                         block_size=BLOCK, **options)


def test_a_follow_up_turn_finds_the_whole_history_cached():
    """A turn credits its prompt and its generated tokens: the next turn (the history plus
    a short question) has only the question uncached and skips prefill."""
    routing = policy(max_local_prefill_tokens=8)
    first = list(range(40))
    route = routing.choose(first)
    assert route.prefill is not None and route.cached_tokens == 0
    answer = list(range(100, 120))
    routing.record(route, route.decode.address, chain_hashes(first + answer[:-1], BLOCK))
    follow_up = first + answer + [7, 8, 9]
    again = routing.choose(follow_up)
    assert again.cached_tokens == (len(first + answer) - 1) // BLOCK * BLOCK
    assert again.prefill is None  # 7 uncached tokens: the question and the answer's last token
    # Crediting the prompt alone (the old behaviour) would leave the answer uncached.
    other = policy(max_local_prefill_tokens=8)
    other.record(other.choose(first), None)
    assert other.choose(follow_up).prefill is not None


def test_a_short_prompt_skips_a_busy_prefill_worker():
    routing = policy(max_local_prefill_tokens=0, max_decode_prefill_tokens=64)
    prompt = list(range(48))
    assert routing.choose(prompt).prefill is not None  # idle prefill worker: disaggregate
    routing.prefill[0].pending_tokens = 2000             # a long cold prompt is being computed
    route = routing.choose(prompt)
    assert route.prefill is None and route.reason.endswith("+prefill_busy")
    assert routing.choose(list(range(200))).prefill is not None  # over the decode budget
    routing.prefill[0].pending_tokens = 10               # less work queued than this prompt's
    assert routing.choose(prompt).prefill is not None


def test_the_decode_budget_is_off_by_default():
    routing = policy(max_local_prefill_tokens=0)
    routing.prefill[0].pending_tokens = 10_000
    assert routing.choose(list(range(48))).prefill is not None


def test_a_busy_decode_worker_hands_a_short_part_to_an_idle_prefill_worker():
    """Under the local limit the uncached part is computed on the decode worker, unless
    that worker is streaming ``busy_decode_streams`` others and a prefill worker is idle;
    a part shorter than one block stays on the decode worker (it would compute it anyway)."""
    routing = policy(max_local_prefill_tokens=64, busy_decode_streams=2)
    prompt = list(range(48))
    assert routing.choose(prompt).prefill is None          # both idle: compute on decode
    for w in routing.decode:
        w.inflight = 1                                     # one stream each: not busy yet
    assert routing.choose(prompt).prefill is None
    for w in routing.decode:
        w.inflight = 2
    route = routing.choose(prompt)
    assert route.prefill is routing.prefill[0] and route.reason.endswith("+decode_busy")
    assert routing.choose(list(range(BLOCK - 1))).prefill is None  # less than one block
    routing.prefill[0].inflight = 1                        # the prefill worker is busy too
    assert routing.choose(prompt).prefill is None
    routing.prefill[0].inflight = 0
    routing.prefill[0].healthy = False                     # or down
    assert routing.choose(prompt).prefill is None
    off = policy(max_local_prefill_tokens=64)              # the policy's own default: never
    off.decode[0].inflight = off.decode[1].inflight = 5
    assert off.choose(prompt).prefill is None
