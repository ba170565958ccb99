"""Trace-replay simulation of expert offloading: policies, the Belady oracle, and hardware profiles.

A routing trace (``moekit trace``) fixes which experts each token needs at each MoE layer.
Replaying it through a cache model answers "how fast would decoding be with this cache size,
this policy, this prefetcher, on this hardware?" before buying the hardware. The timing model
mirrors :mod:`moekit.offload` step by step:

* tokens are decoded one at a time; each MoE layer first spends ``non_expert_s`` (attention,
  norms and its share of the embedding/lm_head work), then runs its experts one after another;
* an expert not resident waits for its load on the single storage link
  (``expert_bytes / storage_bw``); prefetches issued when the previous layer starts its experts
  run on the same link in the background, one after another, and yield it to demand loads
  (:class:`moekit.offload.store.StorageLink`): a demand load starts at once, a prefetch already
  loading an entry that is demanded finishes first, and one demanded while still queued is
  loaded as a demand load instead;
* computing an expert takes ``expert_bytes / mem_bw`` (decode is memory-bound) or
  ``expert_flops / compute_flops``, whichever is larger.

:func:`ring_timeline` models SE-MoE's ring memory (:mod:`moekit.offload.ring`) the same way,
with :func:`ring_period` its steady state and :func:`ring_sections` the paper's section-count rule.

Policies: ``lru``, ``lfu`` and ``belady`` (evict the entry whose next use is farthest away: the
best any demand policy can do, computable only with the future in hand, i.e. on a trace).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[int, int]


@dataclass
class HardwareProfile:
    """What the simulated machine can do.

    Attributes:
        storage_bw: bytes/s of the link experts are loaded over (SSD, PCIe, throttled store).
        mem_bw: bytes/s at which resident weights stream through compute (a GEMV's rate).
        compute_flops: FLOP/s for the expert matmuls.
        non_expert_s: seconds per token per MoE layer outside the experts.
    """

    storage_bw: float
    mem_bw: float
    compute_flops: float = float("inf")
    non_expert_s: float = 0.0


@dataclass
class SimResult:
    """Outcome of one replay.

    Attributes:
        hits, misses: demand lookups served resident / that waited for a load.
        bytes_read: bytes loaded over the storage link.
        prefetches, prefetch_used: prefetch loads issued, and of those used before eviction.
        seconds: modelled wall time of the replay.
        num_tokens: tokens replayed.
    """

    hits: int
    misses: int
    bytes_read: int
    prefetches: int
    prefetch_used: int
    seconds: float
    num_tokens: int

    @property
    def hit_rate(self) -> float:
        """Share of lookups that did not wait for a demand load."""
        return self.hits / max(1, self.hits + self.misses)

    @property
    def tokens_per_s(self) -> float:
        """Modelled decode speed."""
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def bytes_per_token(self) -> float:
        """Bytes loaded per token."""
        return self.bytes_read / max(1, self.num_tokens)

    def as_dict(self) -> dict:
        """Plain numbers for reports."""
        return {
            "hit_rate": round(self.hit_rate, 4),
            "bytes_per_token": round(self.bytes_per_token),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefetch_accuracy": round(self.prefetch_used / self.prefetches, 4) if self.prefetches else None,
        }


def access_steps(trace, max_tokens: int | None = None) -> list[list[list[int]]]:
    """Per token, per MoE layer, the experts it uses (in slot order, -1 removed)."""
    num_t = trace.num_tokens if max_tokens is None else min(max_tokens, trace.num_tokens)
    rows = [ids[:num_t].tolist() for ids in trace.expert_ids]
    return [
        [[e for e in rows[layer][t] if e >= 0] for layer in range(trace.num_layers)] for t in range(num_t)
    ]


class _Cache:
    """Entry-count-free cache of keys under a byte budget, with lru/lfu/edgemoe/belady eviction
    (``edgemoe`` as :class:`~moekit.offload.ExpertCache` does it: frequency weighted by how soon the
    key's layer runs again after the layer of the latest touch; ties to the least recent)."""

    def __init__(
        self,
        budget: int,
        policy: str,
        sizes: Callable[[Key], int],
        future: list[Key] | None,
        num_layers: int = 1,
    ) -> None:
        if policy not in ("lru", "lfu", "edgemoe", "belady"):
            raise ValueError(f"policy={policy!r} is not valid; choose 'lru', 'lfu', 'edgemoe' or 'belady'")
        if policy == "belady" and future is None:
            raise ValueError("the belady policy needs the future access sequence")
        self.budget, self.policy, self.sizes = budget, policy, sizes
        self.entries: OrderedDict[Key, float] = OrderedDict()  # key -> time it is available
        self.used = 0
        self.freq: dict[Key, int] = {}
        self.prefetched: dict[Key, bool] = {}
        self.next_use: dict[Key, list[int]] = {}
        if future is not None:
            for pos, key in enumerate(future):
                self.next_use.setdefault(key, []).append(pos)
            for positions in self.next_use.values():
                positions.reverse()  # pop() gives the earliest remaining position
        self.pos = 0
        self.num_layers, self.current_layer = num_layers, -1

    def touch(self, key: Key) -> None:
        self.freq[key] = self.freq.get(key, 0) + 1
        self.current_layer = key[0]
        if key in self.entries:
            self.entries.move_to_end(key)

    def advance(self, key: Key) -> None:
        uses = self.next_use.get(key)
        while uses and uses[-1] <= self.pos:
            uses.pop()
        self.pos += 1

    def _victim(self, protect: set[Key]) -> Key | None:
        cands = [k for k in self.entries if k not in protect]
        if not cands:
            return None
        if self.policy == "lru":
            return cands[0]
        if self.policy == "lfu":
            return min(cands, key=lambda k: self.freq.get(k, 0))
        if self.policy == "edgemoe":
            from moekit.compress.edgemoe import eviction_priority

            num_l, cur = self.num_layers, self.current_layer
            return min(cands, key=lambda k: eviction_priority(self.freq.get(k, 0), k[0], cur, num_l))
        far = float("inf")
        return max(cands, key=lambda k: self.next_use[k][-1] if self.next_use.get(k) else far)

    def make_room(self, nbytes: int, protect: set[Key]) -> tuple[bool, int]:
        unused_prefetches = 0
        while self.used + nbytes > self.budget:
            victim = self._victim(protect)
            if victim is None:
                return False, unused_prefetches
            self.entries.pop(victim)
            self.used -= self.sizes(victim)
            if self.prefetched.pop(victim, False):
                unused_prefetches += 1
        return True, unused_prefetches

    def insert(self, key: Key, available_at: float, prefetched: bool = False) -> None:
        self.entries[key] = available_at
        self.used += self.sizes(key)
        if prefetched:
            self.prefetched[key] = True


class _Link:
    """The storage link's timeline: demand loads preempt the FIFO queue of prefetches."""

    def __init__(self) -> None:
        self.queue: deque[list] = deque()  # [key, seconds of transfer left], head = loading
        self.now = 0.0  # the queue's progress is accounted up to this time
        self.finished: dict[Key, float] = {}

    def run_until(self, t: float) -> None:
        """Lets the prefetch queue use the link until ``t``."""
        while self.queue and self.now < t:
            head = self.queue[0]
            step = min(head[1], t - self.now)
            head[1] -= step
            self.now += step
            if head[1] <= 1e-15:
                self.queue.popleft()
                self.finished[head[0]] = self.now
        self.now = max(self.now, t)

    def prefetch(self, t: float, key: Key, seconds: float) -> None:
        self.run_until(t)
        self.queue.append([key, seconds])

    def in_flight(self, key: Key) -> bool:
        return any(item[0] == key for item in self.queue)

    def demand(self, t: float, seconds: float) -> float:
        """A demand load from ``t``: prefetches pause meanwhile. Returns when it is loaded."""
        self.run_until(t)
        self.now = t + seconds
        return self.now

    def wait_for(self, t: float, key: Key, seconds: float) -> tuple[float, bool]:
        """A prefetched ``key`` is demanded at ``t``: ``(time it is ready, whether it was queued)``."""
        self.run_until(t)
        if key in self.finished:
            return self.finished.pop(key), False
        if self.queue and self.queue[0][0] == key:
            self.now = t + self.queue.popleft()[1]
            return self.now, False
        self.queue = deque(item for item in self.queue if item[0] != key)
        return self.demand(t, seconds), True


def replay(
    trace,
    cache_bytes: int,
    expert_bytes: int | Callable[[Key], int],
    hardware: HardwareProfile,
    policy: str = "lru",
    prefetch: Callable[[int, int, list[int]], list[int]] | None = None,
    expert_flops: float = 0.0,
    max_tokens: int | None = None,
) -> SimResult:
    """Replays a trace token by token under a cache, a policy, a prefetcher and a hardware profile.

    Args:
        trace: a :class:`~moekit.analysis.RoutingTrace`.
        cache_bytes: budget for resident plus in-flight experts.
        expert_bytes: bytes of one expert entry (or a function of ``(layer, expert)``).
        hardware: the machine.
        policy: ``"lru"``, ``"lfu"``, ``"edgemoe"`` or ``"belady"``.
        prefetch: ``f(token, layer, experts_used_at_layer) -> experts to prefetch for layer+1``.
        expert_flops: FLOPs of one expert on one token (``2 * 3 * D * F`` for SwiGLU).
        max_tokens: replay at most this many tokens.
    """
    sizes = expert_bytes if callable(expert_bytes) else (lambda key, b=expert_bytes: b)
    steps = access_steps(trace, max_tokens)
    future = [(layer, e) for step in steps for layer, experts in enumerate(step) for e in sorted(experts)]
    cache = _Cache(cache_bytes, policy, sizes, future if policy == "belady" else None, trace.num_layers)
    t = 0.0
    link = _Link()
    hits = misses = bytes_read = prefetches = prefetch_used = 0
    num_layers = trace.num_layers
    for token, step in enumerate(steps):
        for layer, experts in enumerate(step):
            t += hardware.non_expert_s
            if prefetch is not None and layer + 1 < num_layers:
                link.run_until(t)
                protect = {(layer, e) for e in experts} | {item[0] for item in link.queue}
                for e in prefetch(token, layer, experts):
                    key = (layer + 1, e)
                    if key in cache.entries:
                        continue
                    ok, _ = cache.make_room(sizes(key), protect | {key})
                    if not ok:
                        break
                    link.prefetch(t, key, sizes(key) / hardware.storage_bw)
                    cache.insert(key, float("nan"), prefetched=True)
                    protect.add(key)
                    bytes_read += sizes(key)
                    prefetches += 1
            for e in sorted(experts):  # moekit's dispatch runs a layer's experts in id order
                key = (layer, e)
                cache.touch(key)
                if key in cache.entries:
                    was_prefetched = cache.prefetched.pop(key, False)
                    if was_prefetched:
                        ready, queued = link.wait_for(t, key, sizes(key) / hardware.storage_bw)
                        if queued:  # loaded as a demand load instead: not a prefetch after all
                            prefetches -= 1
                        else:
                            prefetch_used += 1
                        cache.entries[key] = ready
                    ready = cache.entries[key]
                    if ready > t:
                        misses += 1
                        t = ready
                    else:
                        hits += 1
                else:
                    link.run_until(t)
                    cache.make_room(sizes(key), {key} | {item[0] for item in link.queue})
                    t = link.demand(t, sizes(key) / hardware.storage_bw)
                    cache.insert(key, t)
                    bytes_read += sizes(key)
                    misses += 1
                cache.advance(key)
                compute = max(sizes(key) / hardware.mem_bw, expert_flops / hardware.compute_flops)
                t += compute
    return SimResult(hits, misses, bytes_read, prefetches, prefetch_used, t, len(steps))


def belady_hit_rate(trace, cache_entries: int, max_tokens: int | None = None) -> float:
    """Hit rate of the optimal offline policy with room for ``cache_entries`` equal-sized experts."""
    steps = access_steps(trace, max_tokens)
    seq = [(layer, e) for step in steps for layer, experts in enumerate(step) for e in sorted(experts)]
    nxt = [0] * len(seq)
    last: dict[Key, int] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], len(seq) + i)
        last[seq[i]] = i
    resident: dict[Key, int] = {}
    heap: list[tuple[int, Key]] = []
    hits = 0
    for i, key in enumerate(seq):
        if key in resident:
            hits += 1
        elif len(resident) >= cache_entries:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        resident[key] = nxt[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits / max(1, len(seq))


def transition_prefetcher(trace, top_k: int = 2) -> Callable[[int, int, list[int]], list[int]]:
    """The statistical (EdgeMoE) predictor for replays: likely next experts given this layer's first choice."""
    tables = [t.tolist() for t in trace.transition_topk(top_k)]

    def predict(token: int, layer: int, experts: list[int]) -> list[int]:
        if layer >= len(tables) or not experts:
            return []
        return list(tables[layer][experts[0]])

    return predict


def oracle_prefetcher(trace) -> Callable[[int, int, list[int]], list[int]]:
    """Prefetches exactly the experts the next layer will use (an upper bound for predictors)."""
    steps = access_steps(trace)

    def predict(token: int, layer: int, experts: list[int]) -> list[int]:
        return steps[token][layer + 1] if layer + 1 < len(steps[token]) else []

    return predict


@dataclass
class RingSimResult:
    """Outcome of a ring-memory timeline (:func:`ring_timeline`).

    Attributes:
        seconds: modelled wall time.
        stall_s: time the compute waited for a layer's load.
        layer_loads: whole-layer loads; demand_loads: of those, loads waited for from their start.
        bytes_read: bytes loaded over the link.
        layer_starts: when each layer's compute started, in execution order.
        num_tokens: tokens run.
    """

    seconds: float
    stall_s: float
    layer_loads: int
    demand_loads: int
    bytes_read: int
    layer_starts: list[float]
    num_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Modelled decode speed."""
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")


def ring_timeline(
    num_tokens: int,
    layer_bytes: list[int],
    compute_s: list[float],
    storage_bw: float,
    num_sections: int,
) -> RingSimResult:
    """SE-MoE ring memory (:class:`moekit.offload.ring.LayerRing`) step by step on one link.

    Each token runs MoE layers 0..L-1 in order; layer i takes ``compute_s[i]`` (its attention
    and experts). On arriving at layer i the ring (1) loads layer i on demand if no section holds
    it, (2) queues the loads of the missing layers of the window i+1 .. i+S-1 into the sections
    outside it (the one layer i-1 just freed, in the steady cycle), then (3) waits for layer i.
    Loads go one after another over one link at ``storage_bw`` bytes/s; a demand load goes first.
    """
    num_l = len(layer_bytes)
    if len(compute_s) != num_l:
        raise ValueError(f"compute_s has {len(compute_s)} entries for {num_l} layers")
    if num_sections < 1 or storage_bw <= 0:
        raise ValueError("ring_timeline needs num_sections >= 1 and a positive storage_bw")
    num_s = min(num_sections, num_l)
    sections: list[int | None] = [None] * num_s
    link = _Link()
    t = stall = 0.0
    loads = demands = nbytes = 0
    starts: list[float] = []
    pending: set[int] = set()  # layers whose queued load the compute has not waited for yet

    def claim(layer: int, keep: set[int]) -> None:
        s = next(i for i, held in enumerate(sections) if held is None or held not in keep)
        sections[s] = layer

    for _token in range(num_tokens):
        for i in range(num_l):
            arrive = t
            window = [(i + j) % num_l for j in range(num_s)]
            if i not in sections:
                claim(i, set(window) - {i})
                t = link.demand(t, layer_bytes[i] / storage_bw)
                loads, demands, nbytes = loads + 1, demands + 1, nbytes + layer_bytes[i]
            for ahead in window[1:]:
                if ahead not in sections:
                    claim(ahead, set(window))
                    link.prefetch(t, (ahead, -1), layer_bytes[ahead] / storage_bw)
                    pending.add(ahead)
                    loads, nbytes = loads + 1, nbytes + layer_bytes[ahead]
            if i in pending:  # queued behind the loads before it: wait for the link
                pending.discard(i)
                ready, _ = link.wait_for(t, (i, -1), layer_bytes[i] / storage_bw)
                t = max(t, ready)
            stall += t - arrive
            starts.append(t)
            t += compute_s[i]
    return RingSimResult(t, stall, loads, demands, nbytes, starts, num_tokens)


def ring_period(compute_s: float, load_s: float, num_sections: int, num_layers: int) -> float:
    """Steady-state seconds per layer of the ring on one link, every layer alike: ``compute + load``
    with one section (nothing overlaps), ``max(compute, load)`` with 2 <= S < L (the link or the
    compute is the bottleneck), ``compute`` once S >= L (every layer stays resident)."""
    if num_sections >= num_layers:
        return compute_s
    if num_sections == 1:
        return compute_s + load_s
    return max(compute_s, load_s)


def ring_sections(copy_s: float, compute_s: float, section_bytes: int, budget_bytes: int) -> int:
    """SE-MoE's section-count rule: the smallest K with copy(one layer) <= compute(K - 1 layers),
    so the copy of layer i + K - 1 fits in the compute of layers i .. i + K - 2, capped by the
    sections the memory budget holds. Raises ``ValueError`` when the budget holds no section."""
    if section_bytes <= 0 or budget_bytes < section_bytes:
        raise ValueError(
            f"the memory budget {budget_bytes} bytes holds no ring section of {section_bytes} bytes"
        )
    if copy_s < 0 or compute_s <= 0:
        raise ValueError("ring_sections needs copy_s >= 0 and compute_s > 0")
    wanted = max(1, 1 + math.ceil(copy_s / compute_s - 1e-12))
    return min(wanted, budget_bytes // section_bytes)
