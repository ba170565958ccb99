"""``blind judge``: automatic raters that fill in ratings for large runs, each pair judged in both orders.

A judge is a callable ``judge(prompt, first, second)`` returning ``"first"``, ``"second"``,
``"tie"`` or ``"both_bad"``, or a ``(verdict, score_first, score_second)`` tuple with 1-5 scores or
None. Two kinds come with moekit, named by a JUDGE spec:

* ``fn:package.module:function``: any importable function with that signature (the hook);
* ``fn:moekit.blind.judge:python_prefix_judge``, a ready-made hook for code: the answer that keeps
  ``prompt + answer`` (cut at its last complete line) valid Python, as far as it goes, wins;
  both valid is a tie, neither is both-bad;
* ``loglik:MODEL_DIR[:margin=0.0]``: a third model's log-likelihood judge. Each answer is scored by
  the judge model's mean log-probability per answer token given the prompt (length-normalised, so
  short answers are not favoured for being short); the higher score wins unless the two are
  within ``margin`` nats/token (a tie).

Every pair is judged as (left, right) and again as (right, left). Agreeing orders give that
verdict; disagreeing orders give a tie, so a judge that prefers whichever answer comes first
cannot move the result. Both raw verdicts go into the line (``orders``) and the number of
inconsistent pairs into the summary. The judge sees only ``pairs.jsonl``, never the key: it is as
blind as a human rater. Its ratings go to ``ratings/<name>.jsonl`` like a human's; a rerun skips
the pairs that file already holds.
"""

from __future__ import annotations

import codeop
import importlib
import re
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

from moekit.blind.make import read_pairs
from moekit.blind.ratings import Rating, append_rating, rater_file, read_ratings

VERDICTS = ("first", "second", "tie", "both_bad")


def load_function(target: str) -> Callable:
    """``package.module:function`` imported (ValueError naming what is missing)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge function {target!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"judge function {target!r}: cannot import {e.name!r}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"judge function {target!r}: {module_name} has no callable {attr!r}")
    return fn


def valid_python_prefix(text: str) -> bool:
    """Whether ``text``, cut at its last newline and dedented, is valid Python so far.

    ``codeop.compile_command`` tells a syntax error from input that is merely unfinished (an
    open block or bracket), which is what a cut-off answer is.
    """
    text = textwrap.dedent(text[: text.rfind("\n")] if "\n" in text else text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of odd but valid code
            codeop.compile_command(text + "\n", symbol="exec")
    except (SyntaxError, ValueError, OverflowError):
        return False
    return True


def python_prefix_judge(prompt: str, first: str, second: str) -> str:
    """A judge hook for code prompts: prefer the answer that keeps the code valid (see above)."""
    ok1, ok2 = valid_python_prefix(prompt + first), valid_python_prefix(prompt + second)
    if ok1 == ok2:
        return "tie" if ok1 else "both_bad"
    return "first" if ok1 else "second"


class LoglikJudge:
    """The judge model's length-normalised log-likelihood of each answer given the prompt.

    Args:
        model_dir: any folder :func:`moekit.from_pretrained` opens (it needs its tokenizer.json).
        margin: nats per token within which two answers tie.
    """

    def __init__(self, model_dir: str | Path, margin: float = 0.0):
        from moekit.loader import load_model_and_tokenizer

        if margin < 0:
            raise ValueError(f"loglik judge margin must be >= 0, got {margin}")
        loaded = load_model_and_tokenizer(model_dir)
        self.model, self.tok, self.eos = loaded.model, loaded.tokenizer, loaded.eos_token_id
        self.margin = margin

    def score(self, prompt: str, answer: str) -> float:
        """Mean log p(answer token | prompt, earlier answer tokens) in nats; an empty answer is
        scored by its end-of-text token. The prompt is cut from the left to fit the context."""
        import torch

        prompt_ids = self.tok.encode(prompt).ids
        answer_ids = self.tok.encode(answer).ids if answer else [self.eos]
        context = self.model.config.max_position_embeddings
        answer_ids = answer_ids[: context - 1]
        prompt_ids = prompt_ids[-(context - len(answer_ids)) :] or [self.eos]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logp_SV = self.model(ids).logits[0].float().log_softmax(-1)
        start = len(prompt_ids)
        targets = ids[0, start:]
        picked = logp_SV[start - 1 : -1].gather(-1, targets[:, None])
        return float(picked.mean())

    def __call__(self, prompt: str, first: str, second: str):
        s1, s2 = self.score(prompt, first), self.score(prompt, second)
        verdict = "tie" if abs(s1 - s2) <= self.margin else "first" if s1 > s2 else "second"
        return verdict, None, None, {"loglik_first": s1, "loglik_second": s2}


def parse_judge(spec: str) -> tuple[str, Callable]:
    """A JUDGE spec (module docstring) as ``(default rater name, callable)``."""
    kind, sep, rest = spec.partition(":")
    if kind == "fn" and sep:
        fn = load_function(rest)
        return "judge-fn-" + re.sub(r"[^A-Za-z0-9_.-]", "-", rest.rpartition(":")[2])[:40], fn
    if kind == "loglik" and sep:
        match = re.match(r"^(.*?)(?::margin=([0-9.eE+-]+))?$", rest)
        path, margin = match.group(1), float(match.group(2) or 0.0)
        return "judge-loglik-" + re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).name)[:40], LoglikJudge(
            path, margin
        )
    raise ValueError(
        f"judge spec {spec!r}: expected 'fn:package.module:function' or 'loglik:MODEL_DIR[:margin=M]'"
    )


def _call(judge: Callable, prompt: str, first: str, second: str):
    """(verdict, score_first, score_second, extra) from a judge's answer, checked."""
    out = judge(prompt, first, second)
    if isinstance(out, str):
        out = (out, None, None)
    verdict, s1, s2, *extra = out
    if verdict not in VERDICTS:
        raise ValueError(f"a judge must return one of {', '.join(VERDICTS)}, got {verdict!r}")
    return verdict, s1, s2, (extra[0] if extra else {})


def judge_both_orders(judge: Callable, prompt: str, left: str, right: str) -> dict:
    """Judges (left, right) and (right, left); returns the combined screen-side verdict and the raw ones.

    Returns ``{"choice", "score_left", "score_right", "consistent", "orders": {"left_first",
    "right_first"}, "detail"}`` with ``choice`` in left/right/tie/both_bad; scores are averaged
    over the two orders (rounded to an integer 1-5) when both orders give them.
    """
    v1, l1, r1, d1 = _call(judge, prompt, left, right)
    v2, r2, l2, d2 = _call(judge, prompt, right, left)
    as_side_1 = {"first": "left", "second": "right"}.get(v1, v1)
    as_side_2 = {"first": "right", "second": "left"}.get(v2, v2)
    consistent = as_side_1 == as_side_2
    choice = as_side_1 if consistent else "tie"

    def avg(a, b):
        return None if a is None or b is None else int(round((a + b) / 2))

    return {
        "choice": choice,
        "score_left": avg(l1, l2),
        "score_right": avg(r1, r2),
        "consistent": consistent,
        "orders": {"left_first": as_side_1, "right_first": as_side_2},
        "detail": {"left_first": d1, "right_first": d2},
    }


def judge_folder(folder: str | Path, judge: Callable, name: str, spec: str = "", progress=None) -> dict:
    """Fills ``ratings/<name>.jsonl`` with the judge's both-order verdicts for every pair not yet in it.

    Returns ``{"rater", "judged", "skipped", "inconsistent", "choices": {choice: count}}`` for the
    pairs judged in this call.
    """
    path = rater_file(folder, name)
    done = {r.pair_id for r in read_ratings(path)} if path.is_file() else set()
    summary = {"rater": name, "judged": 0, "skipped": 0, "inconsistent": 0, "choices": {}}
    pairs = read_pairs(folder)
    for i, pair in enumerate(pairs):
        if pair.pair_id in done:
            summary["skipped"] += 1
            continue
        res = judge_both_orders(judge, pair.prompt, pair.left, pair.right)
        rating = Rating(
            rater=name,
            pair_id=pair.pair_id,
            choice=res["choice"],
            score_left=res["score_left"],
            score_right=res["score_right"],
            event="judge",
        )
        append_rating(
            path,
            rating,
            {
                "judge": spec,
                "orders": res["orders"],
                "consistent": res["consistent"],
                "detail": res["detail"],
            },
        )
        summary["judged"] += 1
        summary["inconsistent"] += not res["consistent"]
        summary["choices"][res["choice"]] = summary["choices"].get(res["choice"], 0) + 1
        if progress is not None:
            progress(i + 1, len(pairs))
    return summary
