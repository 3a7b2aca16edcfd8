"""The code in README.md and docs/*.md runs, so the docs cannot drift from the product.

Every fenced block is one of:

- ```` ```bash ```` / ```` ```python ````: run, in order, in the page's work directory (which holds a
  link to the checkout's ``examples/``), and must exit 0 within its timeout;
- ```` ```bash server=URL ````: a long-running command (``tandem serve``, ``tandem agent run``),
  started in the background; the page goes on once ``URL`` answers 200, and it is stopped (SIGTERM)
  when the page ends;
- ```` ```toml file=NAME ```` (or yaml/json): parsed, and written to ``NAME`` when ``file=`` is given;
  without it, only parsed;
- ```` ```text ```` / ```` ```mermaid ```` / ```` ```http ````: a picture, a listing or an HTTP
  exchange, not run;
- anything with ``no-run`` in its info string (```` ```bash no-run ````): shown, not run, on
  purpose (installs, the whole test suite, docker, kubectl, benchmarks).

A block with no info string, or a language not listed here, fails the test: every block says what
it is. Commands run as written, except that the ports 8000 (cloud tier) and 8765 (agent) become free
ports, and ``tandem build examples/digits`` gets ``--quick``. README.md runs first and builds the
digits bundle (``repo/digits/1``, signed with ``keys/tandem.key``); each docs page starts from a
copy of that ``repo/`` and ``keys/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from support import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
RUN = {"bash", "sh", "python"}
DATA = {"toml", "yaml", "json"}
SHOWN = {"text", "mermaid", "http"}  # pictures, listings, HTTP exchanges
PORTS = {"8000": "cloud", "8765": "agent"}
BLOCK_TIMEOUT_S = 600  # a quick digits build on a loaded 2-core machine takes a few minutes

pytestmark = pytest.mark.timeout(1800)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    attrs: dict[str, str]
    flags: set[str]
    code: str

    @property
    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (``` or ~~~ fences, info string parsed)."""
    out = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(2), opening.group(3).strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{page.name}:{start}: unclosed code block"
        words = info.split()
        lang = words[0].lower() if words else ""
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        flags = {w for w in words[1:] if "=" not in w}
        out.append(Block(page, start, lang, attrs, flags, "\n".join(body) + "\n"))
        i += 1
    return out


@dataclass
class Page:
    """A page's work directory, its ports and the servers its blocks started."""

    workdir: Path
    ports: dict[str, int] = field(default_factory=lambda: {p: free_port() for p in PORTS})
    servers: list[tuple[subprocess.Popen[bytes], Path, Block]] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        for literal, port in self.ports.items():
            text = re.sub(rf"(?<![\d.]){literal}(?!\d)", str(port), text)
        return re.sub(r"(tandem build examples/digits\b)", r"\1 --quick", text)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "PYTEST_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env["TANDEM_INTRA_OP_THREADS"] = "1"
        return env

    def argv(self, block: Block, script: Path) -> list[str]:
        return [sys.executable, str(script)] if block.lang == "python" else ["bash", "-euo", "pipefail", str(script)]

    def run(self, block: Block, index: int) -> None:
        if "no-run" in block.flags or block.lang in SHOWN:
            return
        if block.lang in DATA:
            text = self.substitute(block.code)
            {"toml": tomllib.loads, "yaml": yaml.safe_load, "json": json.loads}[block.lang](text)
            if "file" in block.attrs:
                (self.workdir / block.attrs["file"]).write_text(text)
            return
        assert block.lang in RUN, (
            f"{block.where}: a ```{block.lang or '(no info string)'} block is neither run nor marked: "
            f"use bash/python, toml/yaml/json, text/mermaid, or add no-run"
        )
        script = self.workdir / f".block-{index}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(self.substitute(block.code))
        if "server" in block.attrs:
            self.start_server(block, script)
            return
        done = subprocess.run(self.argv(block, script), check=False, cwd=self.workdir, env=self.env(), capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S)
        assert done.returncode == 0, (
            f"{block.where}: the {block.lang} block exited {done.returncode} (a block not meant to run is marked "
            f"```{block.lang} no-run)\n--- block ---\n{block.code}"
            f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-3000:]}{self.server_logs()}"
        )

    def start_server(self, block: Block, script: Path) -> None:
        log = script.with_suffix(".log")
        proc = subprocess.Popen(self.argv(block, script), cwd=self.workdir, env=self.env(), stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append((proc, log, block))
        url = self.substitute(block.attrs["server"])
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{block.where}: the server block exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{block.where}: {url} did not answer 200 within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)

    def server_logs(self) -> str:
        return "".join(f"\n--- log of {b.where} ---\n{log.read_text()[-2000:]}" for _, log, b in self.servers)

    def stop(self) -> None:
        for proc, _, _block in reversed(self.servers):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def run_page(page: Path, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    state = Page(workdir)
    try:
        for i, block in enumerate(blocks(page)):
            state.run(block, i)
    finally:
        state.stop()


@pytest.fixture(scope="module")
def readme_workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """README.md run from an empty directory (it builds repo/digits/1 and keys/ itself)."""
    workdir = tmp_path_factory.mktemp("readme")
    run_page(README, workdir)
    yield workdir


def test_readme_runs_as_written(readme_workdir: Path) -> None:
    assert (readme_workdir / "repo" / "digits" / "1" / "manifest.json").is_file()
    assert (readme_workdir / "keys" / "tandem.pub").is_file()
    assert (readme_workdir / "agent-data").is_dir()


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_docs_page_runs_as_written(page: Path, readme_workdir: Path, tmp_path: Path) -> None:
    for folder in ("repo", "keys"):
        # Bundles and keys only: not what the README's servers left beside them (e.g. a job database).
        shutil.copytree(readme_workdir / folder, tmp_path / folder, ignore=shutil.ignore_patterns(".*"))
    run_page(page, tmp_path)


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's second set-up command is the line of .ci/run that installs and runs the tests, verbatim."""
    setup = [b for b in blocks(README) if b.lang == "bash" and "pip install" in b.code]
    assert len(setup) == 2, "README.md should give exactly two set-up commands (the demo, the tests)"
    demo, tests = (b.code.strip() for b in setup)
    assert demo.endswith("tandem demo") and len(demo.splitlines()) == 1
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if "pip install" in line and "pytest" in line and not line.lstrip().startswith("#")]
    assert ci == [tests], f"README: {tests!r}\n.ci/run: {ci!r}"


def test_every_block_is_run_or_marked() -> None:
    """The rule the runner enforces, checked without running anything (fast feedback for writers)."""
    unmarked = [b.where for page in [README, *DOC_PAGES] for b in blocks(page)
                if "no-run" not in b.flags and b.lang not in RUN | DATA | SHOWN]
    assert not unmarked, f"blocks with no info string or an unknown one (mark them, e.g. ```bash no-run): {unmarked}"


def test_an_unmarked_failing_block_fails(tmp_path: Path) -> None:
    """The runner can fail: a block that exits non-zero, and a block with no info string."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nfalse\n```\n")
    with pytest.raises(AssertionError, match="exited 1"):
        run_page(page, tmp_path / "a")
    page.write_text("```\necho hi\n```\n")
    with pytest.raises(AssertionError, match="neither run nor marked"):
        run_page(page, tmp_path / "b")
    page.write_text("```python no-run\nraise SystemExit(3)\n```\n```python\nprint('ok')\n```\n")
    run_page(page, tmp_path / "c")
