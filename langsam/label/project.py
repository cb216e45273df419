"""A labelling project: a folder holding ``project.json`` and ``project.db`` (SQLite, WAL).

The images stay where they are (``images_dir``); rows store paths relative to it. Every review
action is one ``BEGIN IMMEDIATE`` transaction that changes the object and appends a row to
``actions`` with the object's state before and after, so undo restores ``before`` exactly and a
``kill -9`` loses at most the action in flight. Each action carries a client idempotency key:
the same key twice applies once and returns the first result (a retried HTTP request after a
dropped connection must not accept twice or undo two steps).

Masks are stored as COCO compressed RLE JSON (``{"size": [H, W], "counts": str}``), boxes as
``[x0, y0, x1, y1]`` JSON in original-image pixels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PROJECT_VERSION = 1
DB_NAME = "project.db"
CONFIG_NAME = "project.json"
ROUNDS_DIR = "rounds"
STATUSES = ("proposed", "accepted", "corrected", "rejected", "added")
#: The statuses exported and trained on.
REVIEWED_KEEP = ("accepted", "corrected", "added")
SPLITS = ("train", "val")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    width INTEGER,
    height INTEGER,
    proposed_round INTEGER,
    split TEXT NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'val'))
);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    label TEXT NOT NULL,
    mask_rle TEXT NOT NULL,
    box TEXT NOT NULL,
    score REAL,
    status TEXT NOT NULL CHECK (status IN ('proposed', 'accepted', 'corrected', 'rejected', 'added')),
    round INTEGER,
    proposal_rle TEXT,
    points TEXT,
    reviewer TEXT,
    reviewed_at TEXT
);
CREATE INDEX IF NOT EXISTS objects_image ON objects(image_id);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    image_id INTEGER,
    object_id INTEGER,
    kind TEXT NOT NULL,
    before TEXT,
    after TEXT,
    reviewer TEXT NOT NULL,
    at TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS leases (
    image_id INTEGER PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""

_OBJECT_COLUMNS = ("id", "image_id", "label", "mask_rle", "box", "score", "status", "round",
                   "proposal_rle", "points", "reviewer", "reviewed_at")


class ProjectError(ValueError):
    """A project folder that is missing, not a project, or asked for something it cannot do."""


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str  # relative to the project's images_dir, with "/" separators
    width: int | None
    height: int | None
    proposed_round: int | None
    split: str


@dataclass(frozen=True)
class ObjectRow:
    id: int
    image_id: int
    label: str
    mask_rle: dict[str, Any]
    box: list[float]  # xyxy, original-image pixels
    score: float | None
    status: str
    round: int | None
    proposal_rle: dict[str, Any] | None
    points: list[list[float]] | None  # [[x, y, label], ...], label 1 positive / 0 negative
    reviewer: str | None
    reviewed_at: str | None

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, original-image pixels."""
        return rle_decode(self.mask_rle)

    @property
    def proposal_mask(self) -> np.ndarray | None:
        """The mask the model proposed, kept through corrections; None for an added object."""
        return None if self.proposal_rle is None else rle_decode(self.proposal_rle)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO compressed RLE as JSON-ready ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO compressed RLE (counts as str or bytes) -> (H, W) bool."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]),
                              "counts": counts.encode("ascii") if isinstance(counts, str) else counts}).astype(bool)


def mask_box(mask: np.ndarray) -> list[float]:
    """The tight xyxy box of a non-empty (H, W) mask, pixel edges (x1 = last column + 1)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _image_row(row: sqlite3.Row) -> ImageRow:
    return ImageRow(row["id"], row["path"], row["width"], row["height"], row["proposed_round"], row["split"])


def _object_from_record(record: dict[str, Any]) -> ObjectRow:
    def load(text: str | None) -> Any:
        return None if text is None else json.loads(text)

    return ObjectRow(record["id"], record["image_id"], record["label"], load(record["mask_rle"]), load(record["box"]),
                     record["score"], record["status"], record["round"], load(record["proposal_rle"]),
                     load(record["points"]), record["reviewer"], record["reviewed_at"])


def parse_classes(text: str) -> list[str]:
    """``"a dog, a cat"`` (or one class per line) -> ``["a dog", "a cat"]``, stripped, deduplicated."""
    items = [item.strip() for line in text.splitlines() for item in line.split(",")]
    return list(dict.fromkeys(item for item in items if item))


# --------------------------------------------------------------------------------------------
# The project
# --------------------------------------------------------------------------------------------


class Project:
    """One labelling project. Open with :meth:`init` or :meth:`open`; safe to share between the
    threads of one process (one connection, one lock) and between processes (SQLite locking).

    ``clock`` (seconds, default ``time.time``) is injectable so tests can expire leases without
    sleeping.
    """

    def __init__(self, path: str | os.PathLike, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        config_path = self.path / CONFIG_NAME
        db_path = self.path / DB_NAME
        if not config_path.is_file() or not db_path.is_file():
            raise ProjectError(f"{self.path}: not a langsam label project (no {CONFIG_NAME} and {DB_NAME}); "
                               "create one with 'langsam label init'")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            self.images_dir = Path(config["images_dir"])
            self.classes: list[str] = list(config["classes"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ProjectError(f"{config_path}: unreadable project file ({error})") from error
        self.config = config
        self._clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")

    # -- creating and opening ------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike, images_dir: str | os.PathLike, classes: Sequence[str], *,
             val_fraction: float = 0.2, seed: int = 0, clock: Callable[[], float] = time.time) -> Project:
        """Create a project at ``path`` for the images under ``images_dir`` (recursively).

        ``val_fraction`` of the images (at least one when there are two or more) are held out
        (``split = "val"``), picked with ``random.Random(seed)``: ``label train`` evaluates on
        them before and after tuning and never trains on them.

        Raises:
            ProjectError: ``path`` is an existing non-empty folder, ``images_dir`` holds no
                images, or ``classes`` is empty.
        """
        from langsam.io import iter_image_files

        from langsam.detector import parse_queries

        path = Path(path)
        images_dir = Path(images_dir)
        try:  # the pipeline labels objects with its own normalisation of the queries: use the same
            classes = parse_queries([str(c) for c in classes])
        except ValueError:
            raise ProjectError("no classes given: name at least one, e.g. --classes \"a dog, a cat\"") from None
        if not images_dir.is_dir():
            raise ProjectError(f"{images_dir}: no such folder of images")
        if not 0.0 <= val_fraction < 1.0:
            raise ProjectError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ProjectError(f"{path}: already exists and is not empty; open it, or choose a new folder")
        images_dir = images_dir.resolve()
        files = iter_image_files([images_dir])
        if not files:
            raise ProjectError(f"{images_dir}: no image files found (looked for common image suffixes, recursively)")
        relative = [f.resolve().relative_to(images_dir).as_posix() for f in files]
        n_val = int(round(len(relative) * val_fraction))
        if val_fraction > 0 and len(relative) >= 2:
            n_val = min(max(n_val, 1), len(relative) - 1)
        held_out = set(random.Random(seed).sample(relative, n_val))

        path.mkdir(parents=True, exist_ok=True)
        (path / ROUNDS_DIR).mkdir(exist_ok=True)
        db = sqlite3.connect(path / DB_NAME, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("BEGIN")
            for name, file in zip(relative, files):
                width, height = _image_size(file)
                db.execute("INSERT INTO images (path, width, height, split) VALUES (?, ?, ?, ?)",
                           (name, width, height, "val" if name in held_out else "train"))
            db.execute("COMMIT")
        finally:
            db.close()
        config = {"version": PROJECT_VERSION, "images_dir": str(images_dir), "classes": classes,
                  "created": _iso(clock())}
        from sam.files import atomic_write_text

        atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        logger.info("created project %s: %d images (%d held out), classes %s", path, len(files), n_val, classes)
        return cls(path, clock=clock)

    @classmethod
    def open(cls, path: str | os.PathLike, *, clock: Callable[[], float] = time.time) -> Project:
        """Open an existing project. Raises ProjectError if ``path`` is not one."""
        return cls(path, clock=clock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front, so two
        processes leasing at once serialise instead of both reading the same free image."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @property
    def rounds_dir(self) -> Path:
        return self.path / ROUNDS_DIR

    # -- images --------------------------------------------------------------------------------

    def images(self, split: str | None = None) -> list[ImageRow]:
        """Every image (or those of one split), by id."""
        with self._lock:
            if split is None:
                rows = self._db.execute("SELECT * FROM images ORDER BY id").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM images WHERE split = ? ORDER BY id", (split,)).fetchall()
        return [_image_row(row) for row in rows]

    def image(self, image_id: int) -> ImageRow:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (int(image_id),)).fetchone()
        if row is None:
            raise ProjectError(f"no image with id {image_id}")
        return _image_row(row)

    def image_path(self, image_id: int) -> Path:
        """The image's file, resolved; refuses (ProjectError) anything outside ``images_dir``."""
        row = self.image(image_id)
        base = self.images_dir.resolve()
        target = (base / row.path).resolve()
        if base not in target.parents:
            raise ProjectError(f"image {image_id}: {row.path!r} resolves outside the project's images folder")
        return target

    def unproposed(self, round: int = 1) -> list[ImageRow]:
        """Images still to propose for ``round``: proposed in an earlier round (or never) and with
        no reviewed object yet. Rerunning propose after a kill picks up exactly these."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM images i WHERE (i.proposed_round IS NULL OR i.proposed_round < ?) "
                "AND NOT EXISTS (SELECT 1 FROM objects o WHERE o.image_id = i.id AND o.status != 'proposed') "
                "ORDER BY i.id", (int(round),)).fetchall()
        return [_image_row(row) for row in rows]

    def add_proposals(self, image_id: int, objects: Iterable[dict[str, Any]], round: int) -> list[ObjectRow]:
        """Store one image's proposals in one transaction: replaces its still-``proposed``
        objects, keeps the reviewed ones, sets ``proposed_round``.

        ``objects``: dicts with ``label`` (one of :attr:`classes`), ``mask`` ((H, W) bool; or
        ``mask_rle``, COCO RLE as :func:`rle_encode` makes it), ``box`` (xyxy pixels) and
        ``score`` (float or None).
        """
        image = self.image(image_id)
        records = []
        for obj in objects:
            mask = self._check_mask(image, obj["mask"] if "mask" in obj else rle_decode(obj["mask_rle"]))
            label = self._check_label(obj["label"])
            box = [float(v) for v in obj["box"]]
            if len(box) != 4:
                raise ProjectError(f"box must be [x0, y0, x1, y1], got {obj['box']!r}")
            score = None if obj.get("score") is None else float(obj["score"])
            rle = json.dumps(rle_encode(mask))
            records.append((image.id, label, rle, json.dumps(box), score, int(round), rle))
        with self._transaction() as db:
            db.execute("DELETE FROM objects WHERE image_id = ? AND status = 'proposed'", (image.id,))
            db.executemany("INSERT INTO objects (image_id, label, mask_rle, box, score, status, round, proposal_rle) "
                           "VALUES (?, ?, ?, ?, ?, 'proposed', ?, ?)", records)
            db.execute("UPDATE images SET proposed_round = ? WHERE id = ?", (int(round), image.id))
        return self.objects(image.id)

    def set_image_size(self, image_id: int, width: int, height: int) -> None:
        """Record an image's size (for files whose header could not be read at init)."""
        with self._transaction() as db:
            db.execute("UPDATE images SET width = ?, height = ? WHERE id = ?", (int(width), int(height), int(image_id)))

    # -- objects and the queue ----------------------------------------------------------------

    def objects(self, image_id: int | None = None, statuses: Sequence[str] | None = None) -> list[ObjectRow]:
        """One image's objects (or every object), by id, optionally only some statuses."""
        query, params = "SELECT * FROM objects WHERE 1", []
        if image_id is not None:
            query += " AND image_id = ?"
            params.append(int(image_id))
        if statuses is not None:
            statuses = self._check_statuses(statuses)
            query += f" AND status IN ({', '.join('?' * len(statuses))})"
            params.extend(statuses)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", params).fetchall()
        return [_object_from_record(dict(row)) for row in rows]

    def object(self, object_id: int) -> ObjectRow:
        with self._lock:
            row = self._db.execute("SELECT * FROM objects WHERE id = ?", (int(object_id),)).fetchone()
        if row is None:
            raise ProjectError(f"no object with id {object_id}")
        return _object_from_record(dict(row))

    def queue(self, labels: Sequence[str] | None = None, statuses: Sequence[str] | None = None) -> list[int]:
        """Image ids to review, lowest confidence first: by the minimum score of the image's
        ``proposed`` objects; images with nothing proposed come last (by id).

        With ``labels`` and/or ``statuses``, only images having an object that matches both.
        """
        with self._lock:
            return self._queue(self._db, labels, statuses)

    def _queue(self, db: sqlite3.Connection, labels: Sequence[str] | None, statuses: Sequence[str] | None) -> list[int]:
        where, params = [], []
        if labels is not None:
            labels = list(labels)
            where.append(f"o.label IN ({', '.join('?' * len(labels))})")
            params.extend(labels)
        if statuses is not None:
            statuses = self._check_statuses(statuses)
            where.append(f"o.status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        query = ("SELECT i.id, (SELECT MIN(COALESCE(p.score, 0)) FROM objects p "
                 "WHERE p.image_id = i.id AND p.status = 'proposed') AS confidence FROM images i")
        if where:
            query += f" WHERE EXISTS (SELECT 1 FROM objects o WHERE o.image_id = i.id AND {' AND '.join(where)})"
        query += " ORDER BY confidence IS NULL, confidence, i.id"
        return [row[0] for row in db.execute(query, params).fetchall()]

    # -- leases --------------------------------------------------------------------------------

    def lease_next(self, holder: str, ttl_s: float = 300.0, labels: Sequence[str] | None = None,
                   statuses: Sequence[str] | None = None, skip: Iterable[int] = ()) -> int | None:
        """Lease the first image of the queue that no one else holds a live lease on (this
        holder's own lease counts as free, so a reloaded tab gets its image back); None when
        none is left. ``skip``: image ids to pass over (e.g. "next" from the current one)."""
        holder = _check_name(holder, "holder")
        skip = {int(i) for i in skip}
        now = self._clock()
        with self._transaction() as db:
            db.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))
            taken = {row[0] for row in db.execute("SELECT image_id FROM leases WHERE holder != ?", (holder,))}
            for image_id in self._queue(db, labels, statuses):
                if image_id not in taken and image_id not in skip:
                    db.execute("INSERT OR REPLACE INTO leases (image_id, holder, expires_at) VALUES (?, ?, ?)",
                               (image_id, holder, now + float(ttl_s)))
                    return image_id
        return None

    def renew(self, image_id: int, holder: str, ttl_s: float = 300.0) -> bool:
        """Extend ``holder``'s live lease on ``image_id``; False if it has expired or is someone else's."""
        now = self._clock()
        with self._transaction() as db:
            cursor = db.execute("UPDATE leases SET expires_at = ? WHERE image_id = ? AND holder = ? AND expires_at > ?",
                                (now + float(ttl_s), int(image_id), holder, now))
            return cursor.rowcount == 1

    def release(self, image_id: int, holder: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM leases WHERE image_id = ? AND holder = ?", (int(image_id), holder))

    def lease_holder(self, image_id: int) -> str | None:
        """Who holds a live lease on ``image_id`` (None if no one)."""
        with self._lock:
            row = self._db.execute("SELECT holder FROM leases WHERE image_id = ? AND expires_at > ?",
                                   (int(image_id), self._clock())).fetchone()
        return None if row is None else row[0]

    # -- review actions ------------------------------------------------------------------------

    def accept(self, object_id: int, reviewer: str, key: str) -> list[ObjectRow]:
        """Status -> accepted."""
        return self._act("accept", key, reviewer, object_id, lambda record: {"status": "accepted"})

    def reject(self, object_id: int, reviewer: str, key: str) -> list[ObjectRow]:
        """Status -> rejected (kept, never exported or trained on)."""
        return self._act("reject", key, reviewer, object_id, lambda record: {"status": "rejected"})

    def correct(self, object_id: int, mask: np.ndarray, points: Sequence[Sequence[float]] | None,
                reviewer: str, key: str) -> list[ObjectRow]:
        """Replace the mask (``points``: the clicks that made it, ``[[x, y, label], ...]``).
        Status -> corrected (an ``added`` object stays ``added``); the proposal is kept."""
        current = self.object(object_id)
        mask = self._check_mask(self.image(current.image_id), mask)
        points_json = _points_json(points)

        def change(record: dict[str, Any]) -> dict[str, Any]:
            return {"status": "added" if record["status"] == "added" else "corrected",
                    "mask_rle": json.dumps(rle_encode(mask)), "box": json.dumps(mask_box(mask)), "points": points_json}

        return self._act("correct", key, reviewer, object_id, change)

    def relabel(self, object_id: int, label: str, reviewer: str, key: str) -> list[ObjectRow]:
        """Change the label (one of :attr:`classes`); the status is unchanged."""
        label = self._check_label(label)
        return self._act("relabel", key, reviewer, object_id, lambda record: {"label": label})

    def add(self, image_id: int, label: str, mask: np.ndarray, box: Sequence[float] | None, reviewer: str, key: str,
            points: Sequence[Sequence[float]] | None = None) -> list[ObjectRow]:
        """Add a missed object (status ``added``, no proposal; its ``round`` is the image's
        proposed round, the review it was added in). ``box``: the drawn xyxy box, or None for
        the mask's own box."""
        image = self.image(image_id)
        mask = self._check_mask(image, mask)
        label = self._check_label(label)
        box = mask_box(mask) if box is None else [float(v) for v in box]
        if len(box) != 4:
            raise ProjectError(f"box must be [x0, y0, x1, y1], got {box!r}")
        reviewer = _check_name(reviewer, "reviewer")
        key = _check_name(key, "key")
        at = _iso(self._clock())
        with self._transaction() as db:
            done = self._replay(db, key, "add")
            if done is not None:
                return done
            cursor = db.execute(
                "INSERT INTO objects (image_id, label, mask_rle, box, score, status, round, proposal_rle, points, "
                "reviewer, reviewed_at) VALUES (?, ?, ?, ?, NULL, 'added', ?, NULL, ?, ?, ?)",
                (image.id, label, json.dumps(rle_encode(mask)), json.dumps(box), image.proposed_round,
                 _points_json(points), reviewer, at))
            after = self._record(db, cursor.lastrowid)
            self._log(db, key, "add", image.id, after["id"], None, after, reviewer, at)
        return [_object_from_record(after)]

    def undo(self, reviewer: str, key: str, image_id: int | None = None) -> list[ObjectRow]:
        """Undo ``reviewer``'s last action not yet undone (optionally only on ``image_id``),
        restoring the object's ``before`` exactly (an added object is deleted). Returns the
        restored object(s): empty for an undone add, and when there is nothing to undo.

        Raises:
            ProjectError: someone changed the object after that action (undo would lose it).
        """
        reviewer = _check_name(reviewer, "reviewer")
        key = _check_name(key, "key")
        at = _iso(self._clock())
        with self._transaction() as db:
            done = self._replay(db, key, "undo")
            if done is not None:
                return done
            query = "SELECT * FROM actions WHERE reviewer = ? AND kind != 'undo' AND undone = 0"
            params: list[Any] = [reviewer]
            if image_id is not None:
                query += " AND image_id = ?"
                params.append(int(image_id))
            target = db.execute(query + " ORDER BY id DESC LIMIT 1", params).fetchone()
            if target is None:
                return []
            current = self._record(db, target["object_id"])
            if current != json.loads(target["after"]):
                raise ProjectError(f"cannot undo {target['kind']} of object {target['object_id']}: "
                                   "it was changed by a later action")
            before = None if target["before"] is None else json.loads(target["before"])
            if before is None:
                db.execute("DELETE FROM objects WHERE id = ?", (target["object_id"],))
            else:
                self._write(db, before)
            db.execute("UPDATE actions SET undone = 1 WHERE id = ?", (target["id"],))
            self._log(db, key, "undo", target["image_id"], target["object_id"], current, before, reviewer, at)
        return [] if before is None else [_object_from_record(before)]

    def _act(self, kind: str, key: str, reviewer: str, object_id: int,
             change: Callable[[dict[str, Any]], dict[str, Any]]) -> list[ObjectRow]:
        """One review action on one object: replay if ``key`` was seen, else apply ``change`` to
        the object's record and log before/after, all in one transaction."""
        reviewer = _check_name(reviewer, "reviewer")
        key = _check_name(key, "key")
        at = _iso(self._clock())
        with self._transaction() as db:
            done = self._replay(db, key, kind)
            if done is not None:
                return done
            before = self._record(db, object_id)
            if before is None:
                raise ProjectError(f"no object with id {object_id}")
            after = {**before, **change(before), "reviewer": reviewer, "reviewed_at": at}
            self._write(db, after)
            self._log(db, key, kind, before["image_id"], before["id"], before, after, reviewer, at)
        return [_object_from_record(after)]

    @staticmethod
    def _replay(db: sqlite3.Connection, key: str, kind: str) -> list[ObjectRow] | None:
        """The first result of the action with ``key``, or None if the key is new."""
        row = db.execute("SELECT kind, after FROM actions WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row["kind"] != kind:
            raise ProjectError(f"idempotency key {key!r} was already used for a {row['kind']} action")
        return [] if row["after"] is None else [_object_from_record(json.loads(row["after"]))]

    @staticmethod
    def _record(db: sqlite3.Connection, object_id: int | None) -> dict[str, Any] | None:
        if object_id is None:
            return None
        row = db.execute("SELECT * FROM objects WHERE id = ?", (int(object_id),)).fetchone()
        return None if row is None else {name: row[name] for name in _OBJECT_COLUMNS}

    @staticmethod
    def _write(db: sqlite3.Connection, record: dict[str, Any]) -> None:
        """Insert or overwrite the object row ``record`` (every column, id included)."""
        columns = ", ".join(_OBJECT_COLUMNS)
        db.execute(f"INSERT OR REPLACE INTO objects ({columns}) VALUES ({', '.join('?' * len(_OBJECT_COLUMNS))})",
                   [record[name] for name in _OBJECT_COLUMNS])

    @staticmethod
    def _log(db: sqlite3.Connection, key: str, kind: str, image_id: int, object_id: int,
             before: dict | None, after: dict | None, reviewer: str, at: str) -> None:
        db.execute("INSERT INTO actions (key, image_id, object_id, kind, before, after, reviewer, at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (key, image_id, object_id, kind, None if before is None else json.dumps(before),
                    None if after is None else json.dumps(after), reviewer, at))

    # -- reporting -----------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """``{"images": n, "reviewed_images": n, "objects": {status: count}, "per_image":
        {image_id: (done, total)}}``. An image is reviewed once it has been proposed and none of
        its objects is still ``proposed``; ``done`` counts its objects no longer proposed."""
        with self._lock:
            images = self._db.execute("SELECT id, proposed_round FROM images ORDER BY id").fetchall()
            counts = dict(self._db.execute("SELECT status, COUNT(*) FROM objects GROUP BY status").fetchall())
            per_image = {row[0]: (row[1], row[2]) for row in self._db.execute(
                "SELECT image_id, SUM(status != 'proposed'), COUNT(*) FROM objects GROUP BY image_id")}
        reviewed = sum(1 for row in images
                       if row["proposed_round"] is not None and per_image.get(row["id"], (0, 0))[0]
                       == per_image.get(row["id"], (0, 0))[1])
        return {"images": len(images), "reviewed_images": reviewed,
                "objects": {status: int(counts.get(status, 0)) for status in STATUSES},
                "per_image": {row["id"]: per_image.get(row["id"], (0, 0)) for row in images}}

    def actions(self) -> list[dict[str, Any]]:
        """Every action row, oldest first (``before``/``after`` decoded)."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM actions ORDER BY id").fetchall()
        out = []
        for row in rows:
            record = dict(row)
            for name in ("before", "after"):
                record[name] = None if record[name] is None else json.loads(record[name])
            out.append(record)
        return out

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ("ok" when the database is consistent)."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- checks --------------------------------------------------------------------------------

    def _check_label(self, label: Any) -> str:
        if label not in self.classes:
            raise ProjectError(f"unknown label {label!r}; the project's classes are {self.classes}")
        return label

    @staticmethod
    def _check_statuses(statuses: Sequence[str]) -> list[str]:
        statuses = list(statuses)
        unknown = [s for s in statuses if s not in STATUSES]
        if unknown:
            raise ProjectError(f"unknown status {unknown[0]!r}; choose from {', '.join(STATUSES)}")
        return statuses

    @staticmethod
    def _check_mask(image: ImageRow, mask: Any) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ProjectError(f"a mask must be (H, W), got shape {mask.shape}")
        if mask.dtype != bool:
            if not np.isin(mask, (0, 1)).all():
                raise ProjectError("a mask must be boolean (or 0/1)")
            mask = mask.astype(bool)
        if image.width is not None and mask.shape != (image.height, image.width):
            raise ProjectError(f"mask is {mask.shape[1]}x{mask.shape[0]} but image {image.id} ({image.path}) is "
                               f"{image.width}x{image.height}")
        if not mask.any():
            raise ProjectError("the mask is empty")
        return mask


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProjectError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _points_json(points: Sequence[Sequence[float]] | None) -> str | None:
    if points is None:
        return None
    cleaned = []
    for point in points:
        if len(point) != 3:
            raise ProjectError(f"a point must be [x, y, label], got {list(point)!r}")
        x, y, label = point
        if int(label) not in (0, 1):
            raise ProjectError(f"a point label must be 1 (positive) or 0 (negative), got {label!r}")
        cleaned.append([float(x), float(y), int(label)])
    return json.dumps(cleaned)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _image_size(file: Path) -> tuple[int | None, int | None]:
    """(width, height) from the file's header, EXIF orientation applied; (None, None) if it
    cannot be read (propose then reports the file)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        logger.warning("%s: cannot read the image size (%s); propose will report it", file, error)
        return None, None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
