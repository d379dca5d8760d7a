"""Training data larger than memory: Parquet row groups streamed through a shuffle buffer (``data.stream``).

``ParquetRows`` lists the row groups of the ``data.train`` entries (files, directories with hive partitions, globs)
from their footers alone; ``fit_schema_streamed`` fits the schema in one pass (or on a seeded sample) with the
same ``SchemaFitter`` as ``fit_schema``; ``StreamData`` is the ``BatchSource`` an epoch trains on. Each record
batch is encoded by ``model.data.encode_split``, the in-memory path's code. Validation stays in memory; the test
split is streamed too (``evaluate_streamed``).

Per epoch every rank shuffles the row-group list with the shared generator and reads its contiguous part of the
rows in that order (sized in proportion to its share of a batch; a row group on a boundary is read by both
neighbours, each keeping its part), so ranks read disjoint rows, a number fixed by the footers, and step together
(``StreamData``). Memory per process: the shuffle buffer
(``shuffle_buffer`` rows of encoded arrays, ~120 bytes a row for the demo config), a few decoded pages of each of
the ``interleave`` open row groups, and a few record batches in flight.
"""

from __future__ import annotations

import glob
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from model.data import SchemaFitter, Split, encode_split, needed_columns, read_files
from model.evaluate import gate_entropy, gate_summary, predict, task_metrics, to_tensors
from model.nets import MultiTaskRanker
from model.train import Batch, Placement
from mtrank.config import Config, ConfigError
from mtrank.encoding import FittedSchema

T = TypeVar("T")


@dataclass(frozen=True)
class RowGroup:
    """One row group of one Parquet file."""

    path: str
    index: int  # the row group's index in its file
    rows: int
    partition: dict[str, Any]  # hive partition values (``day=3/`` -> {"day": 3}), added as columns


class ParquetRows:
    """The streamed data of a split (``data.train``, or ``data.test`` for evaluation): every row group of its
    entries, in entry and file order.

    Reads only footers. An entry is a Parquet file, a directory (``partitioning="hive"``; files named ``.*`` or
    ``_*`` are skipped) or a glob; a file lacking a needed column is a ``ConfigError`` naming the config field and
    the file, like ``model.data.read_files``.
    """

    def __init__(self, cfg: Config, split: str = "train"):
        import pyarrow.dataset as ds

        assert cfg.data.stream is not None
        self.read_rows = cfg.data.stream.read_rows
        needed = train_columns(cfg) if split == "train" else needed_columns(cfg)  # evaluation reads gAUC groups too
        self.groups: list[RowGroup] = []
        for i, entry in enumerate(getattr(cfg.data, split)):
            where = f"data.{split}.{i}"
            for name, frag in _fragments(cfg.data.resolve(entry), any(c in entry for c in "*?["), where):
                partition = ds.get_partition_keys(frag.partition_expression) or {}
                present = set(frag.physical_schema.names) | set(partition)
                missing = [(col, field) for col, field in needed.items() if col not in present]
                if missing:
                    raise ConfigError("\n".join(f"{field}: column '{col}' not in {name}" for col, field in missing))
                self.groups += [RowGroup(frag.path, rg.id, rg.num_rows, partition)
                                for rg in frag.row_groups if rg.num_rows]
        self.rows = sum(g.rows for g in self.groups)

    def read(self, parts: Iterable[tuple[RowGroup, int, int]], columns: list[str], interleave: int = 1
             ) -> Iterator[pd.DataFrame]:
        """Rows ``[start, stop)`` of each ``(row group, start, stop)``, as frames of at most ``read_rows`` rows
        holding ``columns`` (partition values included) and nothing else.

        Up to ``interleave`` row groups are open at once, yielding a record batch each in turn; when one ends the
        next part opens (tf.data's ``interleave``). The parts go in ``ceil(n / interleave)`` rounds of equal size,
        so the last round mixes as many row groups as the first (100 parts, interleave 64: two rounds of 50, not 64
        then 36). A row group is decoded incrementally: an open one holds a few pages per column (~1 MB for the
        demo's columns), not the row group.
        """
        parts = list(parts)
        rounds = -(-len(parts) // interleave)
        interleave = -(-len(parts) // max(rounds, 1))
        pending, active = iter(parts), []
        while True:
            while len(active) < interleave and (part := next(pending, None)) is not None:
                active.append(self._frames(*part, columns))
            if not active:
                return
            for frames in list(active):
                df = next(frames, None)
                if df is None:
                    active.remove(frames)
                else:
                    yield df

    def _frames(self, g: RowGroup, start: int, stop: int, columns: list[str]) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        file_columns = [c for c in columns if c not in g.partition]
        with pq.ParquetFile(g.path) as f:
            pos = 0
            for b in f.iter_batches(self.read_rows, row_groups=[g.index], columns=file_columns):
                a, z = max(start - pos, 0), min(stop - pos, b.num_rows)
                pos += b.num_rows
                if z > a:
                    df = b.slice(a, z - a).to_pandas()
                    for k, v in g.partition.items():
                        if k in columns:
                            df[k] = v
                    yield df
                if pos >= stop:
                    return


def _fragments(path: Path, pattern: bool, where: str) -> list[tuple[str, Any]]:
    """One ``data.train`` entry (``where``) -> (name for messages, Parquet file fragment with its footer read)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if pattern:
        files = sorted(glob.glob(str(path), recursive=True))
        if not files:
            raise ConfigError(f"{where}: no files match {path}")
    elif not path.exists():
        raise ConfigError(f"{where}: file not found: {path}")
    out: list[tuple[str, Any]] = []
    for file in files if pattern else [str(path)]:
        root = Path(file) if Path(file).is_dir() else None
        try:  # discovery reads one footer for the schema, ensure_complete_metadata every file's
            frags = list(ds.dataset(file, format="parquet", partitioning="hive" if root else None).get_fragments())
            for frag in frags:
                frag.ensure_complete_metadata()
        except (pa.ArrowInvalid, OSError) as err:
            raise ConfigError(f"{where}: {file}: not a readable Parquet file or directory ({err})") from None
        out += [(str(Path(f.path).relative_to(root)) if root else Path(f.path).name, f) for f in frags]
    return out


def train_columns(cfg: Config) -> dict[str, str]:
    """The columns a streamed epoch reads (features and labels) -> the config field naming each."""
    return {c: field for c, field in needed_columns(cfg).items() if field != "eval.group_column"}


def row_slices(groups: list[RowGroup], lo: int, hi: int) -> list[tuple[RowGroup, int, int]]:
    """The row groups overlapping rows ``[lo, hi)`` of their concatenation, each with its local ``[start, stop)``."""
    rows = np.array([g.rows for g in groups], dtype=np.int64)
    ends = np.cumsum(rows)
    starts = ends - rows
    hit = np.flatnonzero((ends > lo) & (starts < hi))
    return [(groups[i], int(max(lo - starts[i], 0)), int(min(hi, ends[i]) - starts[i])) for i in hit]


def fit_schema_streamed(cfg: Config, data: ParquetRows) -> FittedSchema:
    """``model.data.fit_schema`` over the streamed train data, reading only the columns fitting needs: every row,
    or the first ``fit_sample_rows`` rows of the row groups in an order seeded by ``data.stream.seed``.

    Equal to ``fit_schema`` on the same rows (float sums up to rounding) while a piecewise-linear feature has at
    most ``distinct_sample`` distinct values; above that its edges are quantiles of a uniform sample of them.
    """
    sc = cfg.data.stream
    assert sc is not None
    fitter = SchemaFitter(cfg, sc.distinct_sample)
    groups, stop = data.groups, data.rows
    if sc.fit_sample_rows is not None:
        groups = [groups[i] for i in np.random.default_rng(sc.seed).permutation(len(groups))]
        stop = min(stop, sc.fit_sample_rows)
    if fitter.columns:
        chunks = data.read(row_slices(groups, 0, stop), fitter.columns)
        for df in prefetched(chunks) if sc.prefetch else chunks:
            fitter.update(df)
    return fitter.schema()


# ------------------------------------------------------------------------------------------ batches


def shuffled(chunks: Iterable[dict[str, np.ndarray]], rng: np.random.Generator, size: int, capacity: int,
             n: int) -> Iterator[dict[str, np.ndarray]]:
    """``n`` batches of ``size`` rows, each drawn without replacement from a buffer of row-aligned arrays that
    ``chunks`` refill: a batch, a uniform sample of the buffered rows, is drawn whenever the buffer holds at least
    ``capacity`` rows (and at the end, from what is left). A drawn row's slot is filled by a row from the end
    (O(size) a batch, no copy of the buffer)."""
    buf: dict[str, np.ndarray] = {}
    fill = done = 0

    def draw() -> dict[str, np.ndarray]:
        nonlocal fill
        idx = rng.choice(fill, size, replace=False)
        out = {k: v[idx] for k, v in buf.items()}
        tail = np.arange(fill - size, fill)
        holes, movers = idx[idx < fill - size], tail[~np.isin(tail, idx)]
        for v in buf.values():
            v[holes] = v[movers]
        fill -= size
        return out

    for chunk in chunks:
        m = len(next(iter(chunk.values())))
        if not buf or fill + m > len(next(iter(buf.values()))):  # the first chunk, or one that does not fit
            grown = max(capacity, size) + max(m, 1)
            buf = {k: np.concatenate([buf[k][:fill], np.empty((grown - fill, *v.shape[1:]), v.dtype)]) if buf
                   else np.empty((grown, *v.shape[1:]), v.dtype) for k, v in chunk.items()}
        for k, v in chunk.items():
            buf[k][fill : fill + m] = v
        fill += m
        while fill >= max(capacity, size) and done < n:
            yield draw()
            done += 1
        if done == n:
            return
    while done < n and fill >= size:
        yield draw()
        done += 1
    if done < n:
        raise RuntimeError(f"streamed data ran out after {done} of {n} batches: the files changed since they were listed")


def prefetched(items: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """``items`` produced by a background thread up to ``depth`` ahead; its exception is raised here. Closing the
    returned iterator stops the thread."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(("item", x)):
                    return
            put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put(("error", err))

    thread = threading.Thread(target=work, name="mtrank-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, x = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise x
            yield x
    finally:
        stop.set()
        thread.join()


class StreamData:
    """A ``BatchSource`` over ``ParquetRows`` for one rank (``placement``) and global batches of ``batch_size`` rows.

    Rank r's share of a global batch is ``s_r = len(range(r, batch_size, W))`` rows, as in ``TrainData``. Per
    epoch: the row groups in an order drawn from ``gen`` (the same on every rank); rank r reads its contiguous part
    of the N rows of that order, ``[N S_r / B, N S_(r+1) / B)`` with ``S_r = s_0 + ... + s_(r-1)`` (a row group on
    a boundary is read by both neighbours, each keeping its part), in record batches of the feature and label
    columns, encodes each with ``encode_split`` and yields ``Batch``es from its shuffle buffer. Every rank yields
    ``n_batches`` (the least over ranks of part rows // s_r, known from the footers), so an epoch trains
    ``rows = n_batches * batch_size`` rows and drops the rest: fewer than 2 global batches, the rows left in the
    buffers at the end, different rows every epoch.
    """

    def __init__(self, cfg: Config, schema: FittedSchema, data: ParquetRows, placement: Placement):
        assert cfg.data.stream is not None
        self.cfg, self.schema, self.data, self.placement = cfg, schema, data, placement
        self.stream, self.batch_size, world = cfg.data.stream, cfg.train.batch_size, placement.world_size
        if self.batch_size < 2 * world:
            raise ConfigError(f"train.batch_size: {self.batch_size} is less than 2 rows per process ({world})")
        self.shares = [len(range(r, self.batch_size, world)) for r in range(world)]
        cum = np.concatenate([[0], np.cumsum(self.shares)])
        self.bounds = [data.rows * int(c) // self.batch_size for c in cum]  # rank r reads rows [bounds[r], bounds[r+1])
        self.n_batches = min((self.bounds[r + 1] - self.bounds[r]) // s for r, s in enumerate(self.shares))
        self.columns = list(train_columns(cfg))

    @property
    def rows(self) -> int:
        return self.n_batches * self.batch_size

    def encoded(self, parts: list[tuple[RowGroup, int, int]]) -> Generator[dict[str, np.ndarray], None, None]:
        """Each record batch of ``parts`` (``interleave`` at a time) encoded: model inputs, ``labels``, ``mask``."""
        for df in self.data.read(parts, self.columns, self.stream.interleave):
            s = encode_split(self.cfg, self.schema, df, with_groups=False)
            yield {**s.inputs, "labels": s.labels, "mask": s.mask}

    def batches(self, gen: torch.Generator, batch_size: int, placement: Placement) -> Iterator[Batch]:
        if (batch_size, placement) != (self.batch_size, self.placement):
            raise ValueError("StreamData.batches: not the batch size and placement it was built for")
        r = placement.rank
        order = torch.randperm(len(self.data.groups), generator=gen).tolist()
        rng = np.random.default_rng([int(torch.randint(0, 2**62, (1,), generator=gen)), r])  # this rank's buffer draws
        parts = row_slices([self.data.groups[i] for i in order], self.bounds[r], self.bounds[r + 1])
        source = prefetched(self.encoded(parts)) if self.stream.prefetch else self.encoded(parts)
        device = placement.device
        try:
            for b in shuffled(source, rng, self.shares[r], self.stream.shuffle_buffer, self.n_batches):
                labels, mask = torch.from_numpy(b.pop("labels")).to(device), torch.from_numpy(b.pop("mask")).to(device)
                yield Batch({k: torch.from_numpy(v).to(device) for k, v in b.items()}, labels, mask)
        finally:
            source.close()  # stops the prefetch thread


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_streamed(cfg: Config, schema: FittedSchema, model: MultiTaskRanker, split: str = "test"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model.evaluate.evaluate_split`` over a streamed split: its row groups read in order in record batches,
    encoded and scored batch by batch. Kept per row: the scores, labels, masks and gAUC groups (a few bytes per
    task); gate statistics accumulate as sums. Returns (per-task metrics, gate statistics)."""
    data = ParquetRows(cfg, split)
    scores: dict[str, list[np.ndarray]] = {}
    labels, masks, groups = [], [], []
    sums: dict[str, tuple[np.ndarray, float]] = {}
    for df in data.read(row_slices(data.groups, 0, data.rows), list(needed_columns(cfg))):
        part = encode_split(cfg, schema, df)
        s, gates = predict(model, to_tensors(part))
        for name, v in s.items():
            scores.setdefault(name, []).append(v)
        labels.append(part.labels)
        masks.append(part.mask)
        if part.groups is not None:
            groups.append(part.groups)
        for name, w in gates.items():
            weight, entropy = sums.get(name, (0.0, 0.0))
            sums[name] = (weight + w.sum(axis=0), entropy + float(gate_entropy(w).sum()))
    metrics = task_metrics(cfg, np.concatenate(labels), np.concatenate(masks),
                           np.concatenate(groups) if groups else None, {k: np.concatenate(v) for k, v in scores.items()})
    return metrics, gate_summary(model, sums, data.rows)


# ------------------------------------------------------------------------------------------ a run


def no_rows(cfg: Config) -> pd.DataFrame:
    """A frame with the config's columns and no rows (a warm start keeps its vocabularies when streaming)."""
    return pd.DataFrame({c: pd.Series(dtype=str) for c in needed_columns(cfg)})


def prepare_stream(cfg: Config, placement: Placement, schema: FittedSchema | None = None
                   ) -> tuple[FittedSchema, StreamData, Split]:
    """(schema, streamed train source, validation split) for ``train()``.

    The schema is fitted on the streamed train data unless given (a warm start); every rank fits it itself (the
    same pass, so the same schema). Validation files are read and encoded in memory (every epoch scores them);
    the test split is streamed at the end (``evaluate_streamed``).
    """
    data = ParquetRows(cfg)
    schema = schema if schema is not None else fit_schema_streamed(cfg, data)
    source = StreamData(cfg, schema, data, placement)
    if source.n_batches == 0:
        raise ConfigError(f"data.train: {data.rows} streamed rows make no global batch of train.batch_size "
                          f"{cfg.train.batch_size}")
    d, cols = cfg.data, needed_columns(cfg)
    validation = encode_split(cfg, schema, read_files(d, d.validation, cols))
    return schema, source, validation
