"""``tandem batch``: every input format against raw onnxruntime, ragged tables, resume after SIGKILL
and SIGINT (every row exactly once, equal to an uninterrupted run), and bad input as one clear error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud_support import make_onnx_bundle, make_slow_onnx, make_varlen_onnx
from support import make_bundle, make_keys
from tandem.cloud.batch import BatchOptions, load_model, run_batch
from tandem.shared.bundle import TensorSpec
from tandem.shared.errors import InvalidInput, SignatureError, TensorCodecError

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # the Parquet cases skip; the test extra installs pyarrow
    pa = pq = None

needs_pyarrow = pytest.mark.skipif(pa is None, reason="pyarrow is not installed (pip install pyarrow)")

ROWS = 1000


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batch")
    priv, pub = make_keys(root / "keys")
    toy = make_bundle(root / "repo" / "toy" / "1", priv)
    d = root / "repo" / "slow" / "1"
    make_onnx_bundle(
        d, priv, make_slow_onnx(d / "model.onnx"), "slow", "1",
        [TensorSpec(name="x", datatype="FP32", shape=["batch", 8]), TensorSpec(name="work", datatype="INT64", shape=["batch", 1])],
        [TensorSpec(name="y", datatype="FP32", shape=["batch", 8])],
    )
    d = root / "repo" / "varlen" / "1"
    make_onnx_bundle(
        d, priv, make_varlen_onnx(d / "model.onnx"), "varlen", "1",
        [TensorSpec(name="x", datatype="FP32", shape=["batch", "n"])],
        [TensorSpec(name="mean", datatype="FP32", shape=["batch", 1])],
    )
    x = np.random.default_rng(0).standard_normal((ROWS, 64)).astype(np.float32)
    data = root / "data"
    data.mkdir()
    np.save(data / "x.npy", x)
    np.savez(data / "x.npz", input=x)
    with open(data / "x.jsonl", "w") as f:
        for r in x:
            f.write(json.dumps({"input": r.tolist()}) + "\n")
    if pa is not None:
        pq.write_table(pa.table({"input": [r.tolist() for r in x]}), data / "x.parquet", row_group_size=77)
    return {"root": root, "priv": priv, "pub": pub, "toy": toy, "repo": root / "repo", "data": data}


def reference(env: dict[str, Path]) -> np.ndarray:
    sess = ort.InferenceSession(str(env["toy"] / "cloud-fp32.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.load(env["data"] / "x.npy")})[0]


def read_output(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        return {"logits": np.load(path)}
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return {k: np.array([r[k] for r in rows], np.float32) for k in rows[0]}
    t = pq.read_table(path)
    return {k: np.array(t.column(k).to_pylist(), np.float32) for k in t.column_names}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem.shared.cli", "batch", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("src,dst", [
    ("npy", "npy"), ("npz", "npz"), ("jsonl", "jsonl"), ("npy", "npz"),
    pytest.param("parquet", "parquet", marks=needs_pyarrow),
    pytest.param("jsonl", "parquet", marks=needs_pyarrow),
    pytest.param("parquet", "jsonl", marks=needs_pyarrow),
])
def test_each_format_matches_onnxruntime(env: dict[str, Path], tmp_path: Path, src: str, dst: str) -> None:
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / f"y.{dst}"
    # 1000 rows in chunks of 96: the last chunk is partial; batches of 64 cut across chunks.
    report = run_batch(bundle, env["data"] / f"x.{src}", out, BatchOptions(chunk_rows=96, progress=False))
    assert report.complete and report.rows == ROWS and report.computed_rows == ROWS and report.resumed_rows == 0
    got = read_output(out)
    assert list(got) == ["logits"]
    np.testing.assert_allclose(got["logits"], reference(env), rtol=1e-6, atol=1e-6)
    assert not any(p.name.endswith(".tandem-batch") for p in tmp_path.iterdir()), "the work directory is removed"


@needs_pyarrow
def test_ragged_rows_are_batched_by_shape(env: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 9, 300)]
    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"x": r.tolist()}) + "\n\n" for r in rows))  # blank lines are skipped
    bundle = load_model("varlen:1", repository=env["repo"], trusted_keys=[env["pub"]])
    out = tmp_path / "y.parquet"
    run_batch(bundle, src, out, BatchOptions(chunk_rows=50, batch_size=16, progress=False))
    got = np.array(pq.read_table(out).column("mean").to_pylist(), np.float32)
    want = np.array([[r.astype(np.float32).mean()] for r in rows], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cli_runs_a_repository_model(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "y.npy"
    r = cli("toy", str(env["data"] / "x.npy"), str(out), "--repository", str(env["repo"]), "--trusted-key", str(env["pub"]),
            "--threads", "1", "--chunk-rows", "300")
    assert r.returncode == 0, r.stderr
    assert f"{ROWS} rows" in r.stdout and "rows/s" in r.stdout
    np.testing.assert_allclose(np.load(out), reference(env), rtol=1e-6, atol=1e-6)
    # A finished OUTPUT is not replaced by accident.
    again = cli("toy", str(env["data"] / "x.npy"), str(out), "--repository", str(env["repo"]), "--trusted-key", str(env["pub"]))
    assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr


def _slow_input(tmp_path: Path, rows: int, work: int) -> Path:
    # Row i holds i everywhere: y = 2x says which row each output row came from.
    src = tmp_path / "slow.npz"
    np.savez(src, x=np.repeat(np.arange(rows, dtype=np.float32)[:, None], 8, axis=1), work=np.full((rows, 1), work, np.int64))
    return src


def _wait_journal(work: Path, entries: int, proc: subprocess.Popen[str], deadline_s: float = 120) -> None:
    journal = work / "journal"
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if journal.exists() and sum(1 for line in journal.read_bytes().split(b"\n") if line.strip()) >= entries:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError("no progress in the journal")


def _check_slow_output(out: Path, rows: int) -> None:
    with np.load(out) as z:
        y = z["y"]
    assert y.shape == (rows, 8)
    np.testing.assert_array_equal(y[:, 0], 2 * np.arange(rows, dtype=np.float32))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_an_interrupted_run_resumes_without_computing_a_row_twice(env: dict[str, Path], tmp_path: Path, sig: int) -> None:
    rows = 240
    src = _slow_input(tmp_path, rows, work=400)  # ~50 ms per chunk of 8 rows here: 30 chunks to interrupt
    out = tmp_path / "y.npz"
    args = ["slow", str(src), str(out), "--repository", str(env["repo"]), "--trusted-key", str(env["pub"]),
            "--threads", "1", "--batch-size", "8", "--chunk-rows", "8", "--no-progress"]
    # SIGINT back to its default in the child: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", "batch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_journal(tmp_path / ".y.npz.tandem-batch", 3, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists(), "an interrupted run leaves no OUTPUT"
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130 and "run the same command again to continue" in err and "Traceback" not in err

    r = cli(*args)
    assert r.returncode == 0, r.stderr
    # "240 rows -> ...: computed N in ...; M were done by an earlier run" with N + M == 240 and M >= 3 chunks
    computed = int(r.stdout.split("computed ")[1].split(" ")[0])
    resumed = int(r.stdout.split("; ")[1].split(" ")[0])
    assert resumed >= 24 and computed + resumed == rows, r.stdout
    _check_slow_output(out, rows)

    # Equal to an uninterrupted run, row for row.
    whole = tmp_path / "whole.npz"
    bundle = load_model("slow", repository=env["repo"], trusted_keys=[env["pub"]])
    run_batch(bundle, src, whole, BatchOptions(batch_size=8, chunk_rows=8, progress=False))
    with np.load(out) as a, np.load(whole) as b:
        np.testing.assert_array_equal(a["y"], b["y"])


def test_a_run_with_other_arguments_is_not_mixed_in(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / "y.npy"
    src = env["data"] / "x.npy"
    part = run_batch(bundle, src, out, BatchOptions(chunk_rows=100, stop_after=3, progress=False))
    assert not part.complete and part.computed_rows == 300 and not out.exists()
    with pytest.raises(InvalidInput, match="chunk_rows"):
        run_batch(bundle, src, out, BatchOptions(chunk_rows=64, progress=False))
    resumed = run_batch(bundle, src, out, BatchOptions(chunk_rows=100, progress=False))
    assert resumed.resumed_rows == 300 and resumed.computed_rows == ROWS - 300
    np.testing.assert_allclose(np.load(out), reference(env), rtol=1e-6, atol=1e-6)
    # --restart discards an unfinished run.
    out2 = tmp_path / "z.npy"
    run_batch(bundle, src, out2, BatchOptions(chunk_rows=100, stop_after=2, progress=False))
    again = run_batch(bundle, src, out2, BatchOptions(chunk_rows=64, restart=True, progress=False))
    assert again.resumed_rows == 0 and again.computed_rows == ROWS


def test_a_bundle_signed_by_another_key_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    _, other = make_keys(tmp_path / "other")
    with pytest.raises(SignatureError):
        load_model(str(env["toy"]), trusted_keys=[other])
    r = cli(str(env["toy"]), str(env["data"] / "x.npy"), str(tmp_path / "y.npy"), "--trusted-key", str(other))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "signature" in r.stderr.lower()


def _bad_files(tmp_path: Path) -> None:
    np.save(tmp_path / "narrow.npy", np.zeros((5, 63), np.float32))
    np.save(tmp_path / "vec.npy", np.zeros(5, np.float32))
    np.save(tmp_path / "complex.npy", np.zeros((5, 64), np.complex64))
    np.save(tmp_path / "floats_for_ints.npy", np.zeros((5, 64), np.float64))
    np.savez(tmp_path / "misnamed.npz", image=np.zeros((5, 64), np.float32))
    (tmp_path / "broken.jsonl").write_text(json.dumps({"input": [0.0] * 64}) + "\n{oops\n")
    (tmp_path / "strings.jsonl").write_text(json.dumps({"input": ["a"] * 64}) + "\n")
    (tmp_path / "extra.jsonl").write_text(json.dumps({"input": [0.0] * 64, "label": 3}) + "\n")
    (tmp_path / "ragged.jsonl").write_text(json.dumps({"input": [[0.0], [1.0, 2.0]]}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "x.csv").write_text("1,2\n")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")


@pytest.mark.parametrize("model,src,dst,message", [
    ("toy", "missing.npy", "y.npy", "missing.npy does not exist"),
    ("toy", "narrow.npy", "y.npy", "must have shape [-1, 64]"),
    ("toy", "complex.npy", "y.npy", "input 'input' must be FP32"),
    ("toy", "misnamed.npz", "y.npz", "missing 'input' and unknown 'image'"),
    ("toy", "broken.jsonl", "y.jsonl", "broken.jsonl row 1: not a JSON object"),
    ("toy", "strings.jsonl", "y.jsonl", "input 'input' must be FP32; got strings"),
    ("toy", "extra.jsonl", "y.jsonl", "unknown 'label'"),
    ("toy", "ragged.jsonl", "y.jsonl", "not a rectangular array"),
    ("toy", "empty.jsonl", "y.jsonl", "has no rows"),
    ("toy", "x.csv", "y.npy", "unknown format '.csv'"),
    ("toy", "garbage.npy", "y.npy", "is not a readable npy file"),
    pytest.param("toy", "garbage.parquet", "y.parquet", "is not a readable Parquet file", marks=needs_pyarrow),
    ("toy", "narrow.npy", "y.jsonl", "arrays to arrays, tables to tables"),
    ("nope", "narrow.npy", "y.npy", "no model 'nope' in the repository"),
    ("toy:1 --variant gpu", "narrow.npy", "y.npy", "has no variant or role 'gpu'; it has cloud-fp32 (cloud), edge-fp32 (edge)"),
    ("toy", "vec.npy", "y.npy", "must have 2 dimensions"),
    ("slow", "floats_for_ints.npy", "y.npy", "a .npy file holds one array; the model has inputs [x, work]"),
])
def test_bad_input_is_one_clear_error(env: dict[str, Path], tmp_path: Path, model: str, src: str, dst: str, message: str) -> None:
    _bad_files(tmp_path)
    r = cli(*model.split(), str(tmp_path / src), str(tmp_path / dst), "--repository", str(env["repo"]),
            "--trusted-key", str(env["pub"]), "--threads", "1")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / dst).exists()
    assert not any(p.name.endswith(".tandem-batch") for p in tmp_path.iterdir()), "a refused run leaves no work behind"


def test_floats_for_an_integer_input_are_refused(env: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "x.npz"
    np.savez(src, x=np.zeros((4, 8), np.float32), work=np.full((4, 1), 1.5))
    bundle = load_model("slow", repository=env["repo"], trusted_keys=[env["pub"]])
    with pytest.raises(TensorCodecError, match="input 'work' must be INT64; got FP64"):
        run_batch(bundle, src, tmp_path / "y.npz", BatchOptions(progress=False))


def test_progress_lines_say_throughput_and_eta(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandem.cloud.batch.progress import Progress as _Progress

    p = _Progress(total=1000, initial=200, enabled=True, every_s=0.0)
    time.sleep(0.01)
    p.update(300)
    p.close()
    err = capsys.readouterr().err
    assert "500/1000 rows (50.0%)" in err and "rows/s" in err and "ETA" in err


# --- --queue: the rows as jobs on a real tandem serve ------------------------------------------


@pytest.fixture
def job_server(env: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    from cloud_support import ServerThread
    from support import free_port
    from tandem.cloud.config import load_config

    config = load_config(repository=env["repo"], trusted_keys=[env["pub"]], port=free_port(), access_log=False,
                         jobs={"store_path": tmp_path / "jobs.sqlite3"})
    with ServerThread(config) as s:
        yield s


def _jobs_in(db: Path) -> int:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    finally:
        con.close()


def test_queue_runs_the_rows_as_jobs_and_a_resumed_run_finds_its_jobs(env: dict[str, Path], tmp_path: Path, job_server) -> None:  # type: ignore[no-untyped-def]
    from tandem.cloud.batch import QueueCompute

    out = tmp_path / "y.npy"
    src = env["data"] / "x.npy"
    # 1000 rows, batches of 32 in chunks of 96: 32 jobs; stop after the first chunk (3 jobs).
    q = QueueCompute(job_server.url, "toy", batch_size=32)
    try:
        assert q.version == "1" and q.output_names == ["logits"]
        part = run_batch(q, src, out, BatchOptions(chunk_rows=96, stop_after=1, progress=False))
    finally:
        q.close()
    assert not part.complete and part.computed_rows == 96
    assert _jobs_in(tmp_path / "jobs.sqlite3") == 3
    # Chunk 1 computed but not journaled (a crash between the jobs' results and the journal): its
    # jobs are submitted again with the same keys and found, not made twice.
    work = tmp_path / ".y.npy.tandem-batch"
    (work / "journal").write_bytes(b"")
    r = cli("toy", str(src), str(out), "--queue", job_server.url, "--batch-size", "32", "--chunk-rows", "96")
    assert r.returncode == 0, r.stderr
    assert _jobs_in(tmp_path / "jobs.sqlite3") == 32
    np.testing.assert_allclose(np.load(out), reference(env), rtol=1e-5, atol=1e-6)


def test_queue_bad_input_and_unknown_model_are_clear_errors(env: dict[str, Path], tmp_path: Path, job_server) -> None:  # type: ignore[no-untyped-def]
    _bad_files(tmp_path)
    r = cli("toy", str(tmp_path / "narrow.npy"), str(tmp_path / "y.npy"), "--queue", job_server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "must have shape [-1, 64]" in r.stderr, r.stderr
    r = cli("nope", str(env["data"] / "x.npy"), str(tmp_path / "y.npy"), "--queue", job_server.url)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nope" in r.stderr, r.stderr
    r = cli("toy", str(env["data"] / "x.npy"), str(tmp_path / "y.npy"), "--queue", "ftp://example")
    assert r.returncode == 1 and "http(s) URL" in r.stderr, r.stderr
    from support import free_port

    r = cli("toy", str(env["data"] / "x.npy"), str(tmp_path / "y.npy"), "--queue", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "unreachable" in r.stderr, r.stderr
    assert _jobs_in(tmp_path / "jobs.sqlite3") == 0


def test_measured_chunks_are_kept_for_the_resumed_run(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / "y.npy"
    src = env["data"] / "x.npy"
    # A tiny time per chunk: the smallest measured chunk (256 rows), so the 1000 rows take 4.
    part = run_batch(bundle, src, out, BatchOptions(chunk_seconds=1e-6, stop_after=1, progress=False))
    plan = json.loads((tmp_path / ".y.npy.tandem-batch" / "plan.json").read_text())
    assert plan["chunk_rows"] == 256 and part.computed_rows == 256 and not part.complete
    # Resumed without --chunk-rows: the recorded chunking, whatever a new measurement would say.
    rest = run_batch(bundle, src, out, BatchOptions(progress=False))
    assert rest.resumed_rows == 256 and rest.computed_rows == ROWS - 256 and rest.chunks == 4
    np.testing.assert_allclose(np.load(out), reference(env), rtol=1e-6, atol=1e-6)


def test_parquet_without_pyarrow_says_what_to_install(env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    with pytest.raises(InvalidInput, match="Parquet files need pyarrow: pip install pyarrow"):
        run_batch(bundle, tmp_path / "x.parquet", tmp_path / "y.parquet", BatchOptions(progress=False))


def test_queue_run_survives_a_server_restart_with_every_job_once(env: dict[str, Path], tmp_path: Path) -> None:
    """The server goes away mid-run and comes back on the same port with the same job store: the
    command waits, carries on, and every batch is one job, every row once in OUTPUT."""
    from cloud_support import ServerThread
    from support import free_port
    from tandem.cloud.config import load_config

    port, db = free_port(), tmp_path / "jobs.sqlite3"

    def server() -> ServerThread:
        return ServerThread(load_config(repository=env["repo"], trusted_keys=[env["pub"]], port=port, access_log=False,
                                        jobs={"store_path": db}))

    rows = 240
    src = _slow_input(tmp_path, rows, work=2000)  # ~0.4 s per chunk of 16 rows here: the run lasts ~6 s
    out = tmp_path / "y.npz"
    first = server().start()
    proc = subprocess.Popen([sys.executable, "-m", "tandem.shared.cli", "batch", "slow", str(src), str(out), "--queue", first.url,
                             "--batch-size", "8", "--chunk-rows", "16", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        _wait_journal(tmp_path / ".y.npz.tandem-batch", 3, proc)
        first.stop()
        assert proc.poll() is None, "the run ended before the server went away"
        time.sleep(0.5)  # the command meets a closed port for a moment (it retries for minutes)
        second = server().start()
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        if second is not None:
            second.stop()
    assert proc.returncode == 0, err
    _check_slow_output(out, rows)
    assert _jobs_in(db) == rows // 8


def test_two_runs_on_one_output_do_not_write_the_same_chunks(env: dict[str, Path], tmp_path: Path) -> None:
    import fcntl

    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / "y.npy"
    run_batch(bundle, env["data"] / "x.npy", out, BatchOptions(chunk_rows=100, stop_after=1, progress=False))
    work = tmp_path / ".y.npy.tandem-batch"
    with open(work / ".lock", "a+") as held:  # as another tandem batch holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(InvalidInput, match="another tandem batch is running"):
            run_batch(bundle, env["data"] / "x.npy", out, BatchOptions(chunk_rows=100, progress=False))
    done = run_batch(bundle, env["data"] / "x.npy", out, BatchOptions(chunk_rows=100, progress=False))
    assert done.resumed_rows == 100 and done.computed_rows == ROWS - 100 and not work.exists()


def test_a_work_directory_that_is_not_a_run_is_never_cleared(env: dict[str, Path], tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    for restart in (False, True):
        with pytest.raises(InvalidInput, match="is not a tandem batch run"):
            run_batch(bundle, env["data"] / "x.npy", tmp_path / "y.npy",
                      BatchOptions(work_dir=mine, restart=restart, progress=False))
    assert (mine / "notes.txt").read_text() == "keep me"


def test_journaled_rows_whose_output_file_is_gone_are_computed_again(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / "y.npz"
    part = run_batch(bundle, env["data"] / "x.npz", out, BatchOptions(chunk_rows=128, stop_after=3, progress=False))
    assert part.computed_rows == 384
    (tmp_path / ".y.npz.tandem-batch" / "out-0.npy").unlink()  # the in-place output of the journaled chunks
    again = run_batch(bundle, env["data"] / "x.npz", out, BatchOptions(chunk_rows=128, progress=False))
    assert again.resumed_rows == 0 and again.computed_rows == ROWS
    with np.load(out) as z:
        np.testing.assert_allclose(z["logits"], reference(env), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["jsonl", pytest.param("parquet", marks=needs_pyarrow)])
def test_a_table_run_resumes_at_its_chunk(env: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    """A resumed run finds its first missing chunk inside the file (JSONL seeks to a remembered
    offset then skips lines; Parquet reads forward past the rows done)."""
    bundle = load_model(str(env["toy"]), trusted_keys=[env["pub"]])
    out = tmp_path / f"y.{fmt}"
    src = env["data"] / f"x.{fmt}"
    part = run_batch(bundle, src, out, BatchOptions(chunk_rows=300, batch_size=32, stop_after=1, progress=False))
    assert part.computed_rows == 300
    # Drop the first chunk's journal line and keep the second's: the resumed run starts at row 0,
    # skips rows 300-599 and computes 600-999.
    part2 = run_batch(bundle, src, out, BatchOptions(chunk_rows=300, batch_size=32, stop_after=1, progress=False))
    assert part2.resumed_rows == 300 and part2.computed_rows == 300
    journal = tmp_path / f".y.{fmt}.tandem-batch" / "journal"
    lines = [line for line in journal.read_bytes().split(b"\n") if line.strip()]
    journal.write_bytes(b"\n".join(lines[1:]) + b"\n")
    rest = run_batch(bundle, src, out, BatchOptions(chunk_rows=300, batch_size=32, progress=False))
    assert rest.resumed_rows == 300 and rest.computed_rows == ROWS - 300
    np.testing.assert_allclose(read_output(out)["logits"], reference(env), rtol=1e-6, atol=1e-6)
