"""What the ``moekit mixture`` verbs do, as library functions (the CLI only parses flags).

* :func:`profile_experts`: measure each expert's latency, price its energy, write the config;
* :func:`train_mixture`: score windows, train the gate, save it with validation scores;
* :func:`select_experts`: run the search methods under an energy budget (and a latency bound).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from moekit.mixture.fit import SCORES, Scores, gate_config_for, quality, sample_windows, score
from moekit.mixture.gate import masking_gap, train_gate
from moekit.mixture.profiles import (
    ExpertProfile,
    HardwareProfile,
    LatencyClass,
    MixtureConfig,
    load_mixture_config,
    measure_latency,
    resolve_path,
)
from moekit.mixture.select import METHODS, Objective, branch_and_bound, monotonicity_report


def profile_experts(
    paths: list[str],
    names: list[str] | None = None,
    hardware: HardwareProfile | None = None,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
    latency_classes: dict[str, LatencyClass] | None = None,
    config_dir: str | Path | None = None,
) -> MixtureConfig:
    """Measures every expert (:func:`~moekit.mixture.profiles.measure_latency`) and prices its
    energy with ``hardware``; returns the mixture config.

    Paths in a config are relative to the config's folder, so with ``config_dir`` (where the
    config will be written) each path is stored relative to it; otherwise absolute."""
    from moekit.loader import load_model_and_tokenizer

    hardware = hardware or HardwareProfile()
    names = names or [Path(p).name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"--names lists {len(names)} names for {len(paths)} experts")
    experts = []
    for name, path in zip(names, paths, strict=True):
        loaded = load_model_and_tokenizer(path)
        vocab = min(loaded.tokenizer.get_vocab_size(), loaded.model.config.vocab_size)
        prefill, decode = measure_latency(loaded.model, vocab, prompt_tokens, new_tokens, repeats)
        device, joules = hardware.energy(name, decode)
        experts.append(
            ExpertProfile(
                name=name,
                path=_stored_path(path, config_dir),
                prefill_s_per_token=prefill,
                decode_s_per_token=decode,
                energy_j_per_token=joules,
                device=device,
            )
        )
    return MixtureConfig(experts=experts, latency_classes=latency_classes or {})


def _stored_path(path: str | Path, config_dir: str | Path | None) -> str:
    full = Path(path).resolve()
    if config_dir is None:
        return str(full)
    return os.path.relpath(full, Path(config_dir).resolve())


def train_mixture(
    config_path: str | Path,
    out: str | Path,
    corpus=None,
    num_windows: int = 256,
    num_val_windows: int = 128,
    prompt_len: int = 32,
    cont_len: int = 32,
    embedder: str | None = None,
    embedding: str = "tokens",
    hidden_dim: int = 64,
    steps: int = 300,
    seed: int = 0,
    val_fraction: float = 0.05,
) -> dict:
    """Trains the gate of the mixture at ``config_path``; writes it and ``scores.safetensors`` to
    ``out`` and points the config's ``gate`` at ``out``. Returns a summary (NLLs in nats/token)."""
    from moekit.mixture.runtime import Mixture

    mixture = Mixture.load(config_path)
    mixture.gate = None
    gcfg = gate_config_for(mixture, embedder, embedding, hidden_dim)
    tok, eos = mixture.tokenizer, mixture.eos_token_id
    length = prompt_len + cont_len
    # Both halves are held out from training (moekit train's split): the gate learns where each
    # expert is good on text none of them saw, and select scores subsets on the other half.
    train_w = sample_windows(tok, eos, corpus, "val-a", num_windows, length, seed, val_fraction)
    val_w = sample_windows(tok, eos, corpus, "val-b", num_val_windows, length, seed + 1, val_fraction)
    train_s = score(mixture, train_w, prompt_len, gcfg.embedder, gcfg.embedding)
    val_s = score(mixture, val_w, prompt_len, gcfg.embedder, gcfg.embedding)
    gate, losses = train_gate(gcfg, train_s.emb_ND, train_s.logp_ENT, steps=steps, seed=seed)
    out = Path(out)
    gate.save(out)
    val_s.save(out / SCORES)
    train_s.save(out / "train_scores.safetensors")
    cfg, base = load_mixture_config(config_path)
    gate_path = out.resolve()
    try:
        gate_ref = str(gate_path.relative_to(Path(base).resolve()))
    except ValueError:
        gate_ref = str(gate_path)
    cfg.replace(gate=gate_ref).to_json(config_path)
    all_experts = range(len(gcfg.experts))
    summary = {
        "gate": gate_ref,
        "train_nll_first": losses[0],
        "train_nll_last": losses[-1],
        "val_nll_gate": -quality(gate, val_s)(all_experts),
        "val_nll_uniform": -quality(None, val_s)(all_experts),
        "val_nll_per_expert": {n: float(-val_s.logp_ENT[i].mean()) for i, n in enumerate(gcfg.experts)},
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_scores(config: MixtureConfig, base: Path) -> tuple:
    """``(gate, validation Scores)`` saved by :func:`train_mixture` for this config."""
    from moekit.mixture.gate import MixtureGate

    if not config.gate:
        raise ValueError("the mixture config has no gate; run `moekit mixture train` first")
    folder = resolve_path(base, config.gate)
    gate = MixtureGate.load(folder)
    if not (folder / SCORES).is_file():
        raise ValueError(f"{folder} has no {SCORES}; run `moekit mixture train` again")
    scores = Scores.load(folder / SCORES)
    if scores.experts != config.names or gate.config.experts != config.names:
        raise ValueError(
            f"{folder}: the gate was trained on {scores.experts}, the config lists {config.names}"
        )
    return gate, scores


def select_experts(
    config: MixtureConfig,
    gate,
    scores: Scores,
    energy_budget: float,
    methods: list[str] | None = None,
    latency_bound_s: float | None = None,
    prompt_tokens: int = 64,
    new_tokens: int = 32,
    slack: float = 0.0,
    seed: int = 0,
) -> dict:
    """Runs each search method under ``energy_budget`` (J/token) among the experts that fit
    ``latency_bound_s`` for a request of ``prompt_tokens`` + ``new_tokens``.

    Returns ``{method: SearchResult}`` plus ``"uniform_weights"`` (the best subset when the gate
    is replaced by equal weights: what the gate adds) and, with at most 12 experts,
    ``"monotonicity"`` (:func:`~moekit.mixture.select.monotonicity_report` of the objective over
    all experts) and ``"branch_and_bound_slack"`` (branch and bound with the report's largest
    drop as its slack: exact for this objective, see :mod:`moekit.mixture.select`).
    """
    methods = methods or [*METHODS, "branch_and_bound_slack"]
    unknown = sorted(set(methods) - set(METHODS) - {"branch_and_bound_slack"})
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose from {sorted(METHODS)} or branch_and_bound_slack"
        )
    energy = [e.energy_j_per_token for e in config.experts]
    lat = [e.latency_s(prompt_tokens, new_tokens) for e in config.experts]
    cands = [i for i in range(len(energy)) if latency_bound_s is None or lat[i] <= latency_bound_s]
    fn = quality(gate, scores)
    out: dict = {}
    if len(energy) <= 12:
        out["monotonicity"] = monotonicity_report(Objective(fn), len(energy))
    for m in methods:
        q = Objective(fn)
        if m == "branch_and_bound_slack":
            # The slack is the largest drop one added expert caused over all subsets (the
            # monotonicity report, a one-off calibration that costs one exhaustive pass).
            if "monotonicity" not in out:
                raise ValueError("branch_and_bound_slack needs the monotonicity report (at most 12 experts)")
            out[m] = branch_and_bound(
                q, energy, energy_budget, candidates=cands, slack=out["monotonicity"].max_drop
            )
            out[m].method = m
            continue
        kwargs = {"slack": slack} if m == "branch_and_bound" else {}
        if m == "random":
            kwargs = {"seed": seed}
        if m == "greedy_per_joule":  # the first expert's gain is measured from a uniform guess
            kwargs = {"baseline": -math.log(scores.vocab_size)}
        out[m] = METHODS[m](q, energy, energy_budget, candidates=cands, **kwargs)
    uq = Objective(quality(None, scores))
    out["uniform_weights"] = METHODS["exhaustive"](uq, energy, energy_budget, candidates=cands)
    out["uniform_weights"].method = "uniform_weights"
    return out


def masking_table(gate, train: Scores, val: Scores, steps: int = 300, max_subsets: int = 64) -> list:
    """:func:`~moekit.mixture.gate.masking_gap` on every subset of 2+ experts (at most ``max_subsets``)."""
    from itertools import combinations

    num = len(gate.config.experts)
    subsets = [s for k in range(1, num) for s in combinations(range(num), k) if len(s) >= 2][:max_subsets]
    return masking_gap(gate, (train.emb_ND, train.logp_ENT), (val.emb_ND, val.logp_ENT), subsets, steps=steps)


__all__ = ["load_scores", "masking_table", "profile_experts", "select_experts", "train_mixture"]
