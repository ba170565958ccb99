"""``blind rate``: the rating page, served on 127.0.0.1 by the standard library's http.server.

The server reads ``pairs.jsonl`` and the raters' files, never ``key.json``: nothing it can send
names a system. Endpoints (JSON unless noted):

* ``GET /`` the page (HTML; :mod:`moekit.blind.page`).
* ``GET /api/config`` ``{"num_pairs", "fixed_rater"}`` (``fixed_rater`` set by ``--rater``).
* ``GET /api/pair?rater=ID&index=I`` the pair at position I, the rater's current rating of it,
  and progress.
* ``GET /api/state?rater=ID`` progress and ``next_index``, the first pair the rater has not given a
  verdict (where the page resumes).
* ``POST /api/rate`` ``{"rater", "index", "pair_id", "event", "choice", "score_left",
  "score_right", "comment"}``: appends one line to ``ratings/<rater>.jsonl`` (fsync'd) before
  answering, so an answered click is on disk.
"""

from __future__ import annotations

import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from moekit.blind.make import read_pairs
from moekit.blind.page import PAGE
from moekit.blind.ratings import (
    RATER_ID,
    Rating,
    RatingsFileError,
    append_rating,
    latest,
    rater_file,
    read_ratings,
)

MAX_BODY = 64 * 1024  # a rating is a few hundred bytes; a comment longer than this is a mistake


class RatingStore:
    """The pairs of one blind folder and each rater's current ratings, with a lock per write.

    Args:
        folder: the blind folder.
        fixed_rater: when set, the only rater id accepted.
        skip_bad_lines: start even when a rater's file has bad lines (their complete lines count);
            otherwise such a file is a one-line error on first use.
    """

    def __init__(self, folder: str | Path, fixed_rater: str | None = None, skip_bad_lines: bool = False):
        self.folder = Path(folder)
        self.pairs = read_pairs(folder)
        self.index_of = {p.pair_id: i for i, p in enumerate(self.pairs)}
        if fixed_rater is not None and not RATER_ID.match(fixed_rater):
            raise ValueError(f"--rater must be 1-64 of letters, digits, '_', '.', '-'; got {fixed_rater!r}")
        self.fixed_rater = fixed_rater
        self.skip_bad_lines = skip_bad_lines
        self.lock = threading.Lock()
        self.current: dict[str, dict[str, Rating]] = {}
        if fixed_rater is not None:
            self.ratings_of(fixed_rater)  # a bad file fails now, at startup, not at the first click

    def ratings_of(self, rater: str) -> dict[str, Rating]:
        """The rater's current rating per pair id (read from its file on first use)."""
        if self.fixed_rater is not None and rater != self.fixed_rater:
            raise ValueError(f"this server rates as {self.fixed_rater!r} only")
        path = rater_file(self.folder, rater)
        with self.lock:
            if rater not in self.current:
                records = []
                if path.is_file():
                    try:
                        records = read_ratings(path)
                    except RatingsFileError as err:
                        if not self.skip_bad_lines:
                            raise ValueError(f"{err} (start with --skip-bad-lines to continue)") from None
                        print(f"moekit blind rate: warning: {err}", file=sys.stderr)
                        records = err.kept
                        if not path.read_bytes().endswith(b"\n"):  # end the torn line so ours start clean
                            with open(path, "ab") as f:
                                f.write(b"\n")
                self.current[rater] = latest(records)
            return self.current[rater]

    def progress(self, rater: str) -> dict:
        """``{"num_pairs", "num_done", "next_index"}`` (next_index == num_pairs when all are done)."""
        mine = self.ratings_of(rater)
        done = [p.pair_id in mine and mine[p.pair_id].choice is not None for p in self.pairs]
        next_index = done.index(False) if False in done else len(self.pairs)
        return {"num_pairs": len(self.pairs), "num_done": sum(done), "next_index": next_index}

    def pair(self, rater: str, index: int) -> dict:
        """What the page shows for position ``index``: the pair, the rater's rating, progress."""
        if not 0 <= index < len(self.pairs):
            raise ValueError(f"index must be in [0, {len(self.pairs)}), got {index}")
        p = self.pairs[index]
        rating = self.ratings_of(rater).get(p.pair_id)
        shown = None
        if rating is not None:
            shown = {k: getattr(rating, k) for k in ("choice", "score_left", "score_right", "comment")}
        pair = {"pair_id": p.pair_id, "prompt": p.prompt, "left": p.left, "right": p.right}
        return {"index": index, "pair": pair, "rating": shown, **self.progress(rater)}

    def rate(self, body: dict) -> dict:
        """Validates and appends one click; returns the new progress."""
        rater = body.get("rater")
        if not isinstance(rater, str):
            raise ValueError("rater must be a string")
        self.ratings_of(rater)
        index, pair_id = body.get("index"), body.get("pair_id")
        if pair_id not in self.index_of or self.index_of[pair_id] != index:
            raise ValueError(f"pair {pair_id!r} is not at index {index!r}")
        event = body.get("event", "choice")
        if event not in ("choice", "score", "comment"):
            raise ValueError(f"event must be choice, score or comment, got {event!r}")
        rating = Rating(
            rater=rater,
            pair_id=pair_id,
            choice=body.get("choice"),
            score_left=body.get("score_left"),
            score_right=body.get("score_right"),
            comment=body.get("comment") or "",
            event=event,
        )
        with self.lock:
            append_rating(rater_file(self.folder, rater), rating)
            self.current[rater][pair_id] = rating
        return self.progress(rater)


def _handler(store: RatingStore):
    class Handler(BaseHTTPRequestHandler):
        server_version = "moekit-blind"

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            pass  # one line per click on stderr would bury the URL; errors still go out below

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(
                status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8"
            )

        def _guard(self, fn) -> None:
            try:
                self._json(HTTPStatus.OK, fn())
            except ValueError as e:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
            except OSError as e:  # the disk refused the write: say so, the page keeps the click
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"not saved: {e}"})

        def do_GET(self):
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/config":
                self._json(HTTPStatus.OK, {"num_pairs": len(store.pairs), "fixed_rater": store.fixed_rater})
            elif url.path == "/api/state":
                self._guard(lambda: store.progress(query.get("rater", "")))
            elif url.path == "/api/pair":
                self._guard(lambda: store.pair(query.get("rater", ""), _int(query.get("index"))))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path}"})

        def do_POST(self):
            if urlparse(self.path).path != "/api/rate":
                self._json(HTTPStatus.NOT_FOUND, {"error": "POST /api/rate only"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._json(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
                return
            self._guard(lambda: store.rate(body if isinstance(body, dict) else {}))

    return Handler


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"index must be an integer, got {text!r}") from None


def make_server(store: RatingStore, port: int = 8765, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A threaded HTTP server for ``store`` bound to ``host:port`` (port 0: any free port)."""
    server = ThreadingHTTPServer((host, port), _handler(store))
    server.daemon_threads = True
    return server
