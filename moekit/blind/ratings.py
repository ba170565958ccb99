"""Ratings files: one JSONL file per rater, one line per click, appended and fsync'd.

A line is the rater's whole current state for one pair after that click::

    {"rater": "alice", "pair_id": "3f09...", "choice": "left", "score_left": 4, "score_right": null,
     "comment": "", "event": "choice", "time": 1767000000.0}

``choice`` is ``left``, ``right``, ``tie``, ``both_bad`` or null (scores or a comment given before
the verdict); scores are 1-5 or null. The last line for a pair is the rating, so a rater can amend
a pair and every earlier click stays on disk. Each line goes out in one ``write`` on an
``O_APPEND`` descriptor followed by ``fsync``, so a closed tab or a killed server loses at most the
click in flight, never an earlier one, and two writers never interleave inside a line.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHOICES = ("left", "right", "tie", "both_bad")
RATER_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class RatingsFileError(ValueError):
    """A ratings file with a bad line: ``str(err)`` is one line naming the file and line number.

    Attributes:
        path: the file.
        line: the 1-based number of the first bad line.
        kept: every complete, valid line of the file, parsed (the bad ones left out).
        bad_lines: the numbers of all bad lines.
    """

    def __init__(self, message: str, path: Path, line: int, kept: list, bad_lines: list[int]):
        super().__init__(message)
        self.path, self.line, self.kept, self.bad_lines = path, line, kept, bad_lines


@dataclass(frozen=True, kw_only=True)
class Rating:
    """A rater's state for one pair after one click (see the module docstring)."""

    rater: str
    pair_id: str
    choice: str | None = None
    score_left: int | None = None
    score_right: int | None = None
    comment: str = ""
    event: str = "choice"
    time: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rater, str) or not RATER_ID.match(self.rater):
            raise ValueError(f"rater id must be 1-64 of letters, digits, '_', '.', '-'; got {self.rater!r}")
        if not isinstance(self.pair_id, str) or not self.pair_id:
            raise ValueError(f"pair_id must be a non-empty string, got {self.pair_id!r}")
        if self.choice is not None and self.choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)} or null, got {self.choice!r}")
        for name in ("score_left", "score_right"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value not in (1, 2, 3, 4, 5)):
                raise ValueError(f"{name} must be an integer 1-5 or null, got {value!r}")
        if not isinstance(self.comment, str):
            raise ValueError("comment must be a string")

    def to_json(self) -> str:
        """One line of JSON (no newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> Rating:
        """From a parsed line; unknown fields are ignored (judges add their own)."""
        if not isinstance(data, dict):
            raise ValueError("a line must be a JSON object")
        for required in ("rater", "pair_id"):
            if required not in data:
                raise ValueError(f"missing field {required!r}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def rater_file(folder: str | Path, rater: str) -> Path:
    """``<folder>/ratings/<rater>.jsonl`` (the rater id validated)."""
    if not RATER_ID.match(rater):
        raise ValueError(f"rater id must be 1-64 of letters, digits, '_', '.', '-'; got {rater!r}")
    return Path(folder) / "ratings" / f"{rater}.jsonl"


def append_line(path: str | Path, line: str) -> None:
    """Appends ``line`` plus a newline in one write, then fsyncs (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (line + "\n").encode("utf-8")
        written = os.write(fd, data)
        if written != len(data):  # a short write on a regular file means a full disk
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def append_rating(path: str | Path, rating: Rating, extra: dict | None = None) -> None:
    """Appends one rating line (``extra`` fields, e.g. a judge's raw scores, go in the same line)."""
    if not rating.time:
        rating = Rating(**{**asdict(rating), "time": time.time()})
    record = asdict(rating) | (extra or {})
    append_line(path, json.dumps(record, ensure_ascii=False))


def read_ratings(path: str | Path) -> list[Rating]:
    """Every rating line of one file, in order.

    Raises:
        RatingsFileError: a line that is not valid JSON, not a valid rating, or cut off (the file
            ends mid-line, as after a crash during a write). The message is one line naming the
            file and the first bad line; ``err.kept`` holds every complete valid line.
    """
    path = Path(path)
    data = path.read_bytes()
    kept, bad = [], []
    first_error = ""
    lines = data.split(b"\n")
    torn = bool(lines) and lines[-1] != b""  # no newline at the end: the last write did not finish
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rating = Rating.from_dict(json.loads(raw.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reason = (
                "cut off mid-line (a write that did not finish?)"
                if torn and number == len(lines)
                else (f"not valid JSON ({getattr(e, 'msg', e)})")
            )
            bad.append(number)
            first_error = first_error or f"{path} line {number}: {reason}"
            continue
        except (ValueError, TypeError) as e:
            bad.append(number)
            first_error = first_error or f"{path} line {number}: {e}"
            continue
        kept.append(rating)
    if bad:
        more = f" ({len(bad) - 1} more bad lines)" if len(bad) > 1 else ""
        message = f"{first_error}{more}; {len(kept)} complete lines kept"
        raise RatingsFileError(message, path, bad[0], kept, bad)
    return kept


def latest(ratings: list[Rating]) -> dict[str, Rating]:
    """The last line per pair (a rater's current rating of each pair it touched)."""
    out: dict[str, Rating] = {}
    for rating in ratings:
        out[rating.pair_id] = rating
    return out


def read_folder_ratings(
    folder: str | Path, raters: list[str] | None = None, skip_bad_lines: bool = False, warn=None
) -> dict[str, dict[str, Rating]]:
    """``{rater: {pair_id: latest Rating}}`` for every ratings file of a blind folder.

    ``raters`` keeps only those ids. With ``skip_bad_lines`` a bad file contributes its complete
    lines and ``warn`` (a callable) gets the one-line error; otherwise the error is raised.
    """
    out: dict[str, dict[str, Rating]] = {}
    for path in sorted((Path(folder) / "ratings").glob("*.jsonl")):
        rater = path.stem
        if raters is not None and rater not in raters:
            continue
        try:
            records = read_ratings(path)
        except RatingsFileError as err:
            if not skip_bad_lines:
                raise
            if warn is not None:
                warn(str(err))
            records = err.kept
        wrong = [r for r in records if r.rater != rater]
        if wrong:
            raise ValueError(f"{path}: holds ratings of rater {wrong[0].rater!r}, not {rater!r}")
        out[rater] = latest(records)
    if raters is not None:
        missing = sorted(set(raters) - set(out))
        if missing:
            raise ValueError(f"no ratings file for rater {missing[0]!r} in {Path(folder) / 'ratings'}")
    return out
