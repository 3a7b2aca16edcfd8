"""``tandem batch``: run a model over a file of inputs offline, resumably, with progress.

Inputs and outputs (chosen by the file's suffix):

- arrays: ``.npy`` (one array: the input of a one-input model) or ``.npz`` (one array per model input,
  named like the inputs). Output ``.npy`` (a model with one output) or ``.npz`` (every output, by name).
- tables: JSONL (``.jsonl``/``.ndjson``: one JSON object per line, the input names as keys, each value
  a number or a nested list for one row) or Parquet (``.parquet``/``.pq``: one column per input,
  scalars or lists; ``pyarrow`` needed). Output JSONL or Parquet, one row per input row in the same
  order, the output names as keys/columns.

Arrays go to arrays and tables to tables. Rows of a table may differ in shape (token lists of any
length): rows of equal shapes are batched together. Values convert to the model's dtype when numpy
calls the conversion ``same_kind`` (ints to floats, float64 to float32); anything else (floats for an
integer input, strings for a number) is refused with the input's name.

Resumable: rows are cut into fixed chunks (``chunk_rows``; by default about two seconds of compute,
measured on the first rows and recorded for the run). Each computed chunk is written to the work
directory (``.OUTPUT.tandem-batch/`` beside OUTPUT) and fsynced, then named in an append-only, fsynced
journal; a chunk counts as done only once the journal says so. A run stopped at any point (SIGINT,
SIGKILL, power) and started again with the same arguments computes only the chunks the journal lacks,
then assembles OUTPUT from the chunks in row order through a temporary file and one rename: OUTPUT
holds each input row's result exactly once, or does not exist yet. The work directory records what it
was made from (model, variant digest, input size and time, chunking); a run with other arguments is
refused rather than mixed in (``restart=True`` discards it).

Compute runs on :class:`tandem.cloud.engine.ModelEngine` (one onnxruntime session, ``threads``
intra-op threads, ``batch_size`` rows per run) while a writer thread persists the previous chunk, so
disk waits overlap compute. With a ``queue`` it submits the batches as jobs to a ``tandem serve``
instead (:class:`QueueCompute`: one job per batch, keyed so that a resumed run finds its jobs again).

The package: :mod:`.formats` (reading INPUT), :mod:`.compute` (the embedded engine),
:mod:`.remote` (jobs on a server), :mod:`.work` (plan, lock, chunks, journal, OUTPUT),
:mod:`.progress`, :mod:`.run` (one run), :mod:`.command` (the CLI).
"""

from __future__ import annotations

from .command import main
from .compute import Compute, EngineCompute, load_model
from .formats import format_of
from .remote import QueueCompute
from .run import BatchOptions, BatchReport, run_batch

__all__ = ["BatchOptions", "BatchReport", "Compute", "EngineCompute", "QueueCompute", "format_of", "load_model", "main", "run_batch"]
