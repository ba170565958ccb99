"""Blind side-by-side evaluation of two or more systems (a model folder plus decoding options).

The workflow, one CLI verb per step (``moekit blind make|rate|unblind|judge``):

    make.py      every system answers every prompt; pairs shuffled, anonymised, left/right drawn
                 from a recorded seed; the mapping sealed in key.json
    server.py    the rating page on 127.0.0.1 (page.py); one JSONL line per click, fsync'd
    ratings.py   reading and writing ratings files; a bad line is a one-line error that keeps
                 every complete line
    judge.py     automatic raters (a Python function or a third model's log-likelihood), both orders
    unblind.py   the key applied; win rates, tests, biases, agreement, FastChat/alpaca_eval rows
    stats.py     the statistics (scipy for the tests; Bradley-Terry and Krippendorff's alpha here)
    report.py    report.md, plot.png, summary.json, battles.jsonl, alpaca_eval.json
    spec.py      SPEC and prompt-file parsing

See docs/blind.md.
"""

from moekit.blind.judge import LoglikJudge, judge_both_orders, judge_folder, parse_judge
from moekit.blind.make import make_blind, read_key, read_pairs
from moekit.blind.ratings import Rating, RatingsFileError, read_folder_ratings, read_ratings
from moekit.blind.report import write_unblind
from moekit.blind.spec import SystemSpec, parse_spec, read_prompts
from moekit.blind.unblind import analyse, unblinded_pairs

__all__ = [
    "LoglikJudge",
    "Rating",
    "RatingsFileError",
    "SystemSpec",
    "analyse",
    "judge_both_orders",
    "judge_folder",
    "make_blind",
    "parse_judge",
    "parse_spec",
    "read_folder_ratings",
    "read_key",
    "read_pairs",
    "read_prompts",
    "read_ratings",
    "unblinded_pairs",
    "write_unblind",
]
