"""The output directory: stage checkpoints, the published data, rejects and the manifest.

Layout of ``DIR``::

    _stages/              every row each stage produced, kept and rejected, in committed
                          shards (see ``rare_ray.io.checkpoints``); the next stage reads from here
    data/split=train/     the final rows (hive-partitioned Parquet)
    data/split=validation/
    rejects/stage=<stage>/  every input row that did not make it, with the reason
    manifest.json
    README.md             the dataset card (``rare_ray.io.card``): load_dataset(DIR) reads it
    export/<format>/      SFT exports, if made (``rare-ray export``, ``rare_ray.export``)

``data/``, ``rejects/`` and the manifest that lists their files make one publication, written
without rename or directory moves so that it holds on object stores; the protocol and why it
is correct are in ``rare_ray.io.publication``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow.dataset as pads
import pyarrow.fs as pafs

from rare_ray.io import publication
from rare_ray.io.card import CARD, EXPORTS
from rare_ray.io.checkpoints import Checkpoints
from rare_ray.io.publication import Group, Publication
from rare_ray.vocabulary import ALL_STAGES, INGEST, OutputError, filesystem, storage_problem


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.checkpoints = Checkpoints(self.fs, self.root)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def check_writable(self) -> None:
        probe = self.path(".rare-ray-write-probe")
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as e:
            raise OutputError(
                f"output directory {self.uri!r} is not writable: {storage_problem(e, self.fs)}"
            ) from e

    def clear(self) -> None:
        """Deletes what an earlier run wrote (``--fresh``)."""
        for name in ("_stages", *publication.PUBLISHED, EXPORTS):
            self._delete(self.path(name))
        for name in (publication.MANIFEST, CARD):
            if self.fs.get_file_info(self.path(name)).type == pafs.FileType.File:
                self.fs.delete_file(self.path(name))

    # Publishing ---------------------------------------------------------------------------

    def publish(
        self, groups: Sequence[Group], validation_fraction: float
    ) -> tuple[Publication, bool]:
        """Writes the publication's files (the manifest that lists them comes with ``commit``);
        and whether it wrote any (not when that publication is already complete)."""
        return publication.publish(self.fs, self.root, groups, validation_fraction)

    def commit(self, manifest: Mapping[str, Any]) -> str:
        """The manifest, which lists the publication's files; then every other one is deleted."""
        publication.commit(self.fs, self.root, manifest)
        return self.path(publication.MANIFEST)

    def finish(self, manifest: Mapping[str, Any]) -> None:
        """What ``commit`` does after the manifest, for a rerun that found its publication
        complete: a run killed after the manifest may have left no card, or stale files."""
        if self.fs.get_file_info(self.path(CARD)).type != pafs.FileType.File:
            publication.write_card(self.fs, self.root, manifest)
        publication.tidy(self.fs, self.root, manifest)

    def status(self) -> dict[str, Any]:
        """What a (possibly unfinished) run has written: each pass, its shards and counts."""
        ckpt = self.checkpoints
        ingest = ckpt.pass_of(INGEST)
        shards = ingest.committed()
        passes: dict[str, Any] = {}
        if ingest.complete():
            passes[INGEST] = {
                "complete": True,
                "shards": len(shards),
                "committed": len(shards),
                "kept": sum(s.kept for s in shards.values()),
                "rejected": sum(s.rejected for s in shards.values()),
            }
        rank: dict[str, int] = {name: n for n, name in enumerate(ALL_STAGES)}
        for stage in sorted(set(ckpt.stages()) - {INGEST}, key=lambda s: (rank.get(s, 99), s)):
            attempt = 1
            while True:
                step = ckpt.pass_of(stage, attempt)
                if self.fs.get_file_info(step.path).type == pafs.FileType.NotFound:
                    break
                done = step.committed()
                name = stage if attempt == 1 else f"{stage}/attempt-{attempt}"
                passes[name] = {
                    "complete": step.complete(),
                    "shards": len(shards),
                    "committed": len(done),
                    "kept": sum(s.kept for s in done.values()),
                    "rejected": sum(s.rejected for s in done.values()),
                }
                attempt += 1
        has_manifest = self.fs.get_file_info(self.path(publication.MANIFEST)).type
        return {
            "output": self.uri,
            "passes": passes,
            "published": {"data": self.count_rows("data"), "rejects": self.count_rows("rejects")},
            "finished": has_manifest == pafs.FileType.File,
        }

    def count_rows(self, name: str) -> int:
        """Rows in a published directory (``data`` or ``rejects``)."""
        path = self.path(name)
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return 0
        data = pads.dataset(path, filesystem=self.fs, format="parquet", partitioning="hive")
        return int(data.count_rows())

    # Helpers -------------------------------------------------------------------------------

    def _delete(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)
