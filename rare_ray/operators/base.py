"""What every operator has: a name, the columns it reads, the columns it adds, and ``run``.

``run(ds)`` is lazy and keeps every row: rows that fail carry ``reject_reason``. Counters are
``_<operator>_<name>`` integer columns; the pipeline sums them into the manifest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import pyarrow as pa
import ray.data
from pydantic import BaseModel

from rare_ray.config import EngineConfig
from rare_ray.io.readers import ColumnKind
from rare_ray.rows import REJECT_REASON


class Operator(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def input_columns(self) -> Mapping[str, ColumnKind]:
        """Columns this operator reads, and what they must hold."""

    @property
    @abstractmethod
    def text_key(self) -> str:
        """The column with the document itself (shown with this operator's rejects)."""

    @property
    @abstractmethod
    def output_fields(self) -> Sequence[pa.Field]:
        """Columns this operator adds (counters included), with their types."""

    @abstractmethod
    def run(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        """Every row of ``ds`` with this operator's columns, failures marked for rejects."""

    @property
    def attempts(self) -> int:
        """Passes over the rows: an operator that asks again makes one more pass over the rows
        that failed the pass before, up to this many. The pipeline checkpoints each pass."""
        return 1

    def run_pass(self, ds: ray.data.Dataset, attempt: int) -> ray.data.Dataset:
        """One pass: ``ds`` is the input (attempt 1) or the rows the pass before rejected."""
        return self.run(ds)

    def counter(self, name: str) -> str:
        return f"_{self.name}_{name}"

    def with_outputs(
        self,
        batch: pa.Table,
        outputs: Mapping[str, Sequence[Any]],
        reasons: Sequence[str | None],
    ) -> pa.Table:
        """``batch``'s own columns followed by this operator's, typed by ``output_fields``.

        Earlier counters and this operator's scratch columns (``_*``) are dropped: each stage's
        counters are summed from that stage's own output.
        """
        ours = {f.name for f in self.output_fields}
        base = batch.drop_columns(
            [c for c in batch.column_names if c.startswith("_") or c in ours or c == REJECT_REASON]
        )
        for f in self.output_fields:
            base = base.append_column(f, pa.array(outputs[f.name], f.type))
        return base.append_column(REJECT_REASON, pa.array(reasons, pa.string()))


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class LLMOperator(Operator, Generic[ConfigT]):
    """An operator that generates with an LLM engine; its keys come as a config or keywords."""

    config_class: ClassVar[type[BaseModel]]

    def __init__(
        self,
        engine: EngineConfig,
        config: ConfigT | None = None,
        seed: int = 0,
        **keys: Any,
    ):
        self.engine = engine
        self.config: ConfigT = config or self.config_class(**keys)  # type: ignore[assignment]
        self.seed = seed
