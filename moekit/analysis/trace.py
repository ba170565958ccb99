"""Routing traces: what every MoE layer chose for every token, in one safetensors file.

Shape legend: T = tokens in the trace, K = slots per token (padded, -1/0 where unused),
E = experts of a layer, L = MoE layers.

File format (``moekit-trace`` version 1), read by offloading simulators, placement planning and
pruning:

* tensors ``tokens`` ``[T]`` int32 token ids, ``sequence_ids`` ``[T]`` int32 (which input
  sequence each token came from, in order), and for each MoE layer ``l`` (0-based among MoE
  layers): ``layers.{l}.expert_ids`` ``[T, K]`` int16 and ``layers.{l}.weights`` ``[T, K]``
  float16;
* metadata (strings, as safetensors requires): ``format`` = ``moekit-trace``, ``version`` = ``1``,
  and ``info``: JSON with ``layer_indices`` (decoder layer index of each MoE layer),
  ``num_experts`` (per MoE layer), ``model`` (free text) and ``num_sequences``.

Padding tokens are not written: a trace holds real tokens only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

FORMAT = "moekit-trace"
VERSION = "1"


@dataclass
class RoutingTrace:
    """A routing trace in memory.

    Attributes:
        tokens: ``[T]`` int64 token ids.
        sequence_ids: ``[T]`` int64 source sequence of each token.
        expert_ids: per MoE layer, ``[T, K]`` int64 (-1 unused).
        weights: per MoE layer, ``[T, K]`` float32 (0 unused).
        layer_indices: decoder layer index of each MoE layer.
        num_experts: experts per MoE layer.
        model: free-text description of the model that produced it.
    """

    tokens: Tensor
    sequence_ids: Tensor
    expert_ids: list[Tensor]
    weights: list[Tensor]
    layer_indices: list[int]
    num_experts: list[int]
    model: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """T."""
        return int(self.tokens.numel())

    @property
    def num_layers(self) -> int:
        """L, the number of MoE layers."""
        return len(self.expert_ids)

    def load(self) -> list[Tensor]:
        """Assignments per expert for each MoE layer: a list of ``[E_l]`` float tensors."""
        out = []
        for ids_TK, num_e in zip(self.expert_ids, self.num_experts):
            ids = ids_TK[ids_TK >= 0]
            out.append(torch.bincount(ids, minlength=num_e).to(torch.float32))
        return out

    @classmethod
    def from_steps(cls, steps: list[list[list[int]]], num_experts: int, model: str = "") -> RoutingTrace:
        """A one-sequence trace from decode steps: ``steps[t][layer]`` lists token t's experts there.

        Every layer must give every token the same number of experts (pad with -1 otherwise).
        """
        num_layers = len(steps[0])
        ids = [torch.tensor([step[layer] for step in steps], dtype=torch.long) for layer in range(num_layers)]
        return cls(
            tokens=torch.zeros(len(steps), dtype=torch.long),
            sequence_ids=torch.zeros(len(steps), dtype=torch.long),
            expert_ids=ids,
            weights=[(i >= 0).to(torch.float32) for i in ids],
            layer_indices=list(range(num_layers)),
            num_experts=[num_experts] * num_layers,
            model=model,
        )

    def transition_topk(self, top_k: int = 2) -> list[Tensor]:
        """Per layer pair ``l -> l+1``: ``[E_l, top_k]`` most frequent next experts given a token's
        first choice at layer l (the statistics EdgeMoE predicts with)."""
        tables = []
        for layer in range(self.num_layers - 1):
            first = self.expert_ids[layer][:, 0]
            nxt = self.expert_ids[layer + 1]
            counts = torch.zeros(self.num_experts[layer], self.num_experts[layer + 1])
            for slot in range(nxt.shape[1]):
                ok = (first >= 0) & (nxt[:, slot] >= 0)
                counts.index_put_((first[ok], nxt[ok, slot]), torch.ones(int(ok.sum())), accumulate=True)
            tables.append(counts.topk(min(top_k, counts.shape[1]), dim=-1).indices)
        return tables

    def validate(self) -> None:
        """Raises ``ValueError`` when shapes or ids are inconsistent."""
        num_t = self.num_tokens
        if self.sequence_ids.shape != (num_t,):
            raise ValueError(
                f"trace: sequence_ids has shape {tuple(self.sequence_ids.shape)}, expected ({num_t},)"
            )
        if not (
            len(self.expert_ids) == len(self.weights) == len(self.layer_indices) == len(self.num_experts)
        ):
            raise ValueError(
                "trace: per-layer lists (expert_ids, weights, layer_indices, num_experts) differ in length"
            )
        for i, (ids, w, num_e) in enumerate(zip(self.expert_ids, self.weights, self.num_experts)):
            if ids.shape[0] != num_t or ids.shape != w.shape:
                raise ValueError(
                    f"trace: layer {i} expert_ids {tuple(ids.shape)} / weights {tuple(w.shape)} do not match T={num_t}"
                )
            if ids.numel() and (int(ids.max()) >= num_e or int(ids.min()) < -1):
                raise ValueError(f"trace: layer {i} has expert ids outside [-1, {num_e - 1}]")


def save_trace(trace: RoutingTrace, path: str | os.PathLike) -> Path:
    """Writes ``trace`` to ``path`` (safetensors, atomically: temp file then rename)."""
    from safetensors.torch import save_file

    trace.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "tokens": trace.tokens.to(torch.int32).contiguous(),
        "sequence_ids": trace.sequence_ids.to(torch.int32).contiguous(),
    }
    for i, (ids, w) in enumerate(zip(trace.expert_ids, trace.weights)):
        tensors[f"layers.{i}.expert_ids"] = ids.to(torch.int16).contiguous()
        tensors[f"layers.{i}.weights"] = w.to(torch.float16).contiguous()
    info = {
        "layer_indices": trace.layer_indices,
        "num_experts": trace.num_experts,
        "model": trace.model,
        "num_sequences": int(trace.sequence_ids.max()) + 1 if trace.num_tokens else 0,
        **trace.extra,
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": VERSION, "info": json.dumps(info)})
    os.replace(tmp, path)
    return path


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Reads a trace written by :func:`save_trace`; ``ValueError`` names what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no routing trace at {path}; record one with `moekit trace --model DIR`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not a moekit routing trace (metadata format={meta.get('format')!r})"
                )
            if meta.get("version") != VERSION:
                raise ValueError(
                    f"{path}: trace version {meta.get('version')!r} is not supported (expected {VERSION})"
                )
            info = json.loads(meta["info"])
            keys = set(f.keys())
            num_layers = len(info["layer_indices"])
            missing = [
                k
                for k in ["tokens", "sequence_ids"]
                + [f"layers.{i}.{n}" for i in range(num_layers) for n in ("expert_ids", "weights")]
                if k not in keys
            ]
            if missing:
                raise ValueError(f"{path}: trace is missing tensors {missing}")
            trace = RoutingTrace(
                tokens=f.get_tensor("tokens").long(),
                sequence_ids=f.get_tensor("sequence_ids").long(),
                expert_ids=[f.get_tensor(f"layers.{i}.expert_ids").long() for i in range(num_layers)],
                weights=[f.get_tensor(f"layers.{i}.weights").float() for i in range(num_layers)],
                layer_indices=list(info["layer_indices"]),
                num_experts=list(info["num_experts"]),
                model=info.get("model", ""),
                extra={
                    k: v
                    for k, v in info.items()
                    if k not in ("layer_indices", "num_experts", "model", "num_sequences")
                },
            )
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as e:
        raise ValueError(f"{path}: unreadable routing trace ({type(e).__name__}: {e})") from e
    trace.validate()
    return trace


@torch.no_grad()
def record_trace(
    model, batches: Iterable[tuple[Tensor, Tensor | None]], description: str = ""
) -> RoutingTrace:
    """Runs ``model`` over batches and records every MoE layer's routing for the real tokens.

    Args:
        model: a moekit causal LM (its forward returns ``routing``, one RoutingInfo per MoE layer).
        batches: ``(input_ids [B, S], attention_mask [B, S] or None)`` pairs.
        description: stored as the trace's ``model`` text.
    """
    was_training = model.training
    model.eval()
    tokens, seq_ids = [], []
    ids_per_layer: list[list[Tensor]] | None = None
    w_per_layer: list[list[Tensor]] | None = None
    num_experts: list[int] = []
    next_seq = 0
    for input_ids, attention_mask in batches:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        mask_T = (
            torch.ones(input_ids.numel(), dtype=torch.bool)
            if attention_mask is None
            else attention_mask.reshape(-1).to(torch.bool)
        )
        num_b, seq_len = input_ids.shape
        tokens.append(input_ids.reshape(-1)[mask_T])
        seq_ids.append(
            (torch.arange(num_b).unsqueeze(-1).expand(num_b, seq_len).reshape(-1) + next_seq)[mask_T]
        )
        next_seq += num_b
        if ids_per_layer is None:
            ids_per_layer = [[] for _ in out.routing]
            w_per_layer = [[] for _ in out.routing]
            num_experts = [int(r.router_logits.shape[-1]) for r in out.routing]
        for i, r in enumerate(out.routing):
            ids_per_layer[i].append(r.expert_ids[mask_T])
            w_per_layer[i].append(r.weights[mask_T].float())
    model.train(was_training)
    if ids_per_layer is None:
        raise ValueError("record_trace: no batches were given")
    if not ids_per_layer:
        raise ValueError("record_trace: the model has no MoE layers, so there is no routing to record")
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "is_moe_layer"):
        layer_indices = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    else:
        layer_indices = list(range(len(ids_per_layer)))
    return RoutingTrace(
        tokens=torch.cat(tokens),
        sequence_ids=torch.cat(seq_ids),
        expert_ids=[_cat_padded(parts) for parts in ids_per_layer],
        weights=[_cat_padded(parts, fill=0.0) for parts in w_per_layer],
        layer_indices=layer_indices,
        num_experts=num_experts,
        model=description,
    )


def _cat_padded(parts: list[Tensor], fill: float = -1) -> Tensor:
    # K can differ between batches for dynamic routers (top-p with k=None uses K_max=E, fixed),
    # but k overrides per call may change it: pad to the widest.
    width = max(p.shape[-1] for p in parts)
    padded = [
        torch.cat([p, p.new_full((p.shape[0], width - p.shape[-1]), fill)], -1) if p.shape[-1] < width else p
        for p in parts
    ]
    return torch.cat(padded)
