"""tandem build examples/textclass: a two-input text classifier (which area of the standard library
a sentence documents) on the real all-MiniLM-L6-v2 encoder, a small distilled classifier on the edge."""

from data import load_data  # noqa: E402
from models import LABELS, student, teacher  # noqa: E402 - siblings of this file

SPEC = {
    "name": "textclass",
    "description": f"Which stdlib area a sentence documents ({', '.join(LABELS)}): frozen MiniLM + linear head in the "
                   "cloud, a distilled 2-layer encoder on the edge.",
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"], "pad": 0},
    ],
    "outputs": [{"name": "logits"}],
    "task": {"kind": "classification"},
    "teacher": teacher,
    "student": student,
    "load_data": load_data,
    # The encoder is pretrained and frozen; only the teacher's linear head learns from the labels.
    "train_teacher": True,
    "training": {"teacher_epochs": 6, "teacher_lr": 1e-2, "student_epochs": 6, "student_lr": 3e-3,
                 "batch_size": 64, "temperature": 2.0, "alpha": 0.7, "threads": 1},
    "quick_training": {"teacher_epochs": 2, "student_epochs": 3},
    # The quick build (CI) checks the path on a shared machine: a clearly faster edge, not 4x.
    "quick_budgets": {"edge_min_relative_accuracy": 0.5, "edge_min_speedup": 2.5},
    "search": [{"name": "int8-dyn-emb", "format": "dynamic", "op_types": ["MatMul", "Gemm", "Gather"]}],
    "evaluation": {"latency_runs": 200, "warmup_runs": 20, "throughput_batch_size": 32, "throughput_runs": 10},
    "budgets": {"max_accuracy_drop": 0.02, "edge_min_relative_accuracy": 0.9, "edge_min_speedup": 4.0,
                "edge_min_size_ratio": 3.0},
}
