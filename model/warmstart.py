"""Warm start from a trained model, with the vocabularies extended to new values (``mtrank refresh``).

A refresh must not refit the schema: the learned weights are bound to the encoding (numeric statistics,
piecewise-linear edges, hash buckets, vocabulary rows). Only vocabularies grow: a value of a ``vocab``
feature that the new window holds at least ``min_count`` times and the vocabulary lacks is appended
(up to ``max_vocab``), so every known value keeps its local index. Appending moves the blocks of the
features after it in the one embedding table, so the table is re-laid out and every learned row copied
to its new place; a new value's row starts as a copy of its feature's out-of-vocabulary row, which is
what the model used for that value until now. The warm-started model therefore scores every row exactly
as the old one did before its first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from mtrank.config import Config
from mtrank.encoding import FittedFeature, FittedSchema

TABLE = "embedding.table.weight"


def extend_vocabularies(cfg: Config, schema: FittedSchema, train: pd.DataFrame
                        ) -> tuple[FittedSchema, np.ndarray, dict[str, int]]:
    """Append the new values of each ``vocab`` feature seen in ``train`` -> (schema, source rows, added).

    ``source rows`` is int64 [new table size]: the old embedding row each new row starts from (padding 0
    from 0, a known value from its old row, a new value from its feature's OOV row). ``added``: feature
    name -> number of values appended (features with none are left out).
    """
    from model.data import vocab_counts

    configured = {f.name: f for f in cfg.features}
    features: list[FittedFeature] = []
    sources = [np.zeros(1, dtype=np.int64)]
    added: dict[str, int] = {}
    offset = 1
    for f in schema.features:
        if f.kind == "numeric":
            features.append(f)
            continue
        new: list[str] = []
        if f.encoding == "vocab":
            spec = configured[f.name]
            known = set(f.vocab)
            room = max(spec.max_vocab - len(f.vocab), 0)  # type: ignore[union-attr]
            new = [v for v in vocab_counts(train[f.source], spec.min_count).index if v not in known][:room]  # type: ignore[union-attr]
            new.sort()
            if new:
                added[f.name] = len(new)
        grown = replace(f, vocab=[*f.vocab, *new], offset=offset) if new else replace(f, offset=offset)
        rows = np.arange(f.offset, f.offset + f.size, dtype=np.int64)
        sources += [rows, np.full(len(new), f.offset + 1, dtype=np.int64)]  # new values: the feature's OOV row
        features.append(grown)
        offset += grown.size
    return FittedSchema(features=tuple(features), table_size=offset), np.concatenate(sources), added


@dataclass(frozen=True)
class Prepared:
    """What a warm start hands the trainer: the (extended) schema and the initial weights for it."""

    schema: FittedSchema
    state: dict[str, torch.Tensor]
    vocab_added: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class WarmStart:
    """Trained weights and the schema they were trained with (``model.train.load_run``)."""

    schema: FittedSchema
    state: dict[str, torch.Tensor]
    extend_vocab: bool = True

    def prepare(self, cfg: Config, train: pd.DataFrame) -> Prepared:
        """The schema for training on ``train`` (vocabularies extended unless ``extend_vocab`` is off) and the
        state with the embedding table laid out for it."""
        if not self.extend_vocab:
            return Prepared(self.schema, self.state)
        schema, sources, added = extend_vocabularies(cfg, self.schema, train)
        state = dict(self.state)
        state[TABLE] = self.state[TABLE][torch.from_numpy(sources)].clone()
        return Prepared(schema, state, added)
