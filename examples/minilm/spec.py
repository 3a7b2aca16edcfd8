"""tandem build examples/minilm: the real all-MiniLM-L6-v2 in the cloud, a distilled encoder on the
device, both answering with embeddings in one 384-d space (see README.md)."""

from data import load_data  # noqa: E402
from models import student, teacher  # noqa: E402 - siblings of this file (the spec's directory is on sys.path)

SPEC = {
    "name": "minilm",
    "description": "Sentence embeddings: all-MiniLM-L6-v2 in the cloud, two of its layers, pruned and distilled, on the edge.",
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0},
    ],
    "outputs": [{"name": "embedding"}],
    # A row is good on the edge when its embedding is within cosine 0.9 of the teacher's.
    "task": {"kind": "embedding", "tolerance": 0.9},
    "teacher": teacher,
    "student": student,
    "load_data": load_data,
    "training": {
        "student_epochs": 9,
        # The student starts as the teacher's own weights: a gentler rate than a fresh model's.
        "student_lr": 1e-3,
        "batch_size": 64,
        # Token-level distillation (student token states vs the teacher's last layer) beside the
        # sentence embedding: every token is a target, not only the pooled sentence.
        "hidden_weight": 1.0,
        # bfloat16 autocast for the teacher's targets and the student's steps (this CPU has
        # AVX512-BF16): the same validation cosine per epoch as fp32, at 2.5x less CPU per epoch
        # and a 5x cheaper teacher pass, which buys the extra text and the epochs.
        "precision": "bf16",
        # One thread: on a busy 2-core machine two training threads wait on each other (an epoch
        # took several times longer with 2 than with 1 while other work ran).
        "threads": 1,
    },
    "quick_training": {"student_epochs": 2},
    # A quick build (CI) trains 2 epochs on 1,500 sentences: it checks the path, not the quality,
    # and times the variants with few runs on a machine other jobs share, so it asks for a
    # clearly faster edge rather than the full build's 4x.
    "quick_budgets": {"edge_min_relative_accuracy": 0.5, "edge_min_speedup": 2.5},
    # Dynamic int8 over matrix products, with and without the token table (Gather): static QDQ
    # calibration brings nothing on CPU for this encoder and costs minutes.
    "search": [
        {"name": "int8-dyn-mm", "format": "dynamic", "op_types": ["MatMul", "Gemm"]},
        {"name": "int8-dyn-emb", "format": "dynamic", "op_types": ["MatMul", "Gemm", "Gather"]},
    ],
    "evaluation": {"latency_runs": 200, "warmup_runs": 20, "throughput_batch_size": 32, "throughput_runs": 10},
    "budgets": {
        # cosine to the fp32 teacher may drop by at most 0.01 under int8 (so the cloud stays >= 0.99)
        "max_accuracy_drop": 0.01,
        "min_speedup": 1.1,
        # The edge must be 4x faster (batch 1, mixed lengths) and 3x smaller than the cloud variant.
        "edge_min_speedup": 4.0,
        "edge_min_size_ratio": 3.0,
        # Its cosine to the teacher, relative to the cloud variant's: see README.md for what it reaches.
        "edge_min_relative_accuracy": 0.75,
    },
}
