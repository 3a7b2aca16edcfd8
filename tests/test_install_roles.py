"""Each role runs on what its install brings, and a missing extra is named in one line.

The base install (``pip install tandem``) is the client, the edge runtime and the agent; ``[cloud]``
adds the server's dependencies and ``[build]`` the build stack. Here each role's code runs for real
in a subprocess whose imports of the other roles' distributions are blocked by a meta-path hook, as
if they were not installed: an app's edge inference and the agent's CLI without the cloud and build
extras, ``tandem serve`` answering a request without the build extra, and ``tandem build`` /
``tandem serve`` without theirs, which must exit 2 with the one-line message naming the extra.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from support import free_port, make_bundle, make_keys

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Import names of distributions whose names differ from their module's, and modules that come with
#: an extra's distributions without being named in pyproject.toml (scikit-learn brings scipy).
MODULE_OF = {"scikit-learn": "sklearn", "prometheus-client": "prometheus_client",
             "onnxconverter-common": "onnxconverter_common", "pyyaml": "yaml"}
BROUGHT_ALONG = {"build": ["scipy"]}

pytestmark = pytest.mark.timeout(300)


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements]


def extra_modules(extra: str) -> list[str]:
    names = _names(PYPROJECT["project"]["optional-dependencies"][extra])
    return sorted({MODULE_OF.get(n, n.replace("-", "_")) for n in names} | set(BROUGHT_ALONG.get(extra, [])))


def with_blocked_imports(code: str, blocked: list[str]) -> str:
    """``code`` preceded by a meta-path hook under which importing any of ``blocked`` fails as if absent."""
    hook = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {sorted(blocked)!r}
        class _NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, _NotInstalled())
    """)
    return hook + textwrap.dedent(code)


def blocked_python(code: str, blocked: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter in which importing any of ``blocked`` fails as if absent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    return subprocess.run([sys.executable, "-c", with_blocked_imports(code, blocked), *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_the_base_install_names_no_build_or_server_dependency() -> None:
    base = {MODULE_OF.get(n, n.replace("-", "_")) for n in _names(PYPROJECT["project"]["dependencies"])}
    assert {"numpy", "onnxruntime", "aiohttp", "cryptography"} <= base
    for extra in ("build", "cloud"):
        assert not base & set(extra_modules(extra)), f"the base install carries {base & set(extra_modules(extra))}"
    assert "torch" in extra_modules("build") and "sklearn" in extra_modules("build") and "matplotlib" in extra_modules("build")
    assert {"httptools", "prometheus_client", "uvloop", "redis"} <= set(extra_modules("cloud"))


def test_client_edge_runtime_and_agent_run_without_the_cloud_and_build_extras(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    bundle = make_bundle(tmp_path / "repo" / "toy" / "1", private, name="toy", version="1")
    done = blocked_python("""
        import sys
        import numpy as np
        from tandem.edge import Budget, HybridClient
        import tandem.edge.agent.daemon, tandem.edge.agent.local_api, tandem.edge.agent.sync, tandem.edge.cli
        from tandem.shared.cli import main

        with HybridClient(sys.argv[1], trusted_keys=sys.argv[2]) as client:
            result = client.infer(np.zeros((3, 64), np.float32), Budget(local_only=True))
        assert result.route.tier == "edge", result.route
        print("rows", next(iter(result.outputs.values())).shape[0])
        assert main(["bundle", "verify", "--key", sys.argv[2], sys.argv[1]]) == 0
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
    """, extra_modules("build") + extra_modules("cloud"), str(bundle), str(public))
    assert done.returncode == 0, done.stderr
    assert "rows 3" in done.stdout
    # The agent's CLI parses and reports on a directory that holds no agent yet.
    done = blocked_python("""
        import sys
        from tandem.shared.cli import main
        sys.exit(main(["agent", "status", "--data", sys.argv[1]]))
    """, extra_modules("build") + extra_modules("cloud"), str(tmp_path / "agent-data"))
    assert "Traceback" not in done.stderr and "extra" not in done.stderr, done.stderr


def test_tandem_serve_answers_without_the_build_extra(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path / "keys")
    make_bundle(tmp_path / "repo" / "toy" / "1", private, name="toy", version="1")
    port = free_port()
    serve = """
        import sys
        from tandem.shared.cli import main
        sys.exit(main(["serve", "--repository", sys.argv[1], "--trusted-key", sys.argv[2], "--host", "127.0.0.1",
                       "--port", sys.argv[3]]))
    """
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(TANDEM_INTRA_OP_THREADS="1", TANDEM_WARMUP_BATCH_SIZES="[1]")
    proc = subprocess.Popen([sys.executable, "-c", with_blocked_imports(serve, extra_modules("build")), str(tmp_path / "repo"), str(public),
                             str(port)], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                       "data": np.zeros(64).tolist()}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/toy/infer", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["outputs"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(("argv", "extra"), [
    (["build", "{root}/examples/digits", "--repository", "{tmp}/repo", "--key", "{tmp}/k/tandem.key", "--no-progress"], "build"),
    (["serve", "--repository", "{tmp}/repo", "--trusted-key", "{tmp}/keys/tandem.pub", "--port", "0"], "cloud"),
])
def test_a_command_without_its_extra_names_it_in_one_line(argv: list[str], extra: str, tmp_path: Path) -> None:
    private, _ = make_keys(tmp_path / "keys")
    make_bundle(tmp_path / "repo" / "toy" / "1", private, name="toy", version="1")
    args = [a.format(root=ROOT, tmp=tmp_path) for a in argv]
    done = blocked_python("""
        import sys
        from tandem.shared.cli import main
        sys.exit(main(sys.argv[1:]))
    """, extra_modules(extra), *args, timeout=240)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines()[-1] == f"tandem {argv[0]} needs the {extra} extra: pip install 'tandem[{extra}]'", done.stderr
    assert "Traceback" not in done.stderr


def test_missing_extras_are_read_from_the_installed_metadata(tmp_path: Path) -> None:
    """Before a command starts, the dispatcher checks the distributions its extras list in the
    installed metadata: a distribution that is not installed names its extra."""
    dist = tmp_path / "tandem_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tandem-probe\nVersion: 1.0\n"
        "Requires-Dist: numpy>=1\n"
        'Requires-Dist: surely-not-installed-distribution>=1; extra == "build"\n'
        'Requires-Dist: numpy>=1; extra == "cloud"\n'
    )
    code = f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from tandem.shared import cli
        cli.DISTRIBUTION = "tandem-probe"
        assert cli.extras_requirements() == {{"build": ["surely-not-installed-distribution"], "cloud": ["numpy"]}}, cli.extras_requirements()
        assert cli.missing_extras("build") == ["build"]
        assert cli.missing_extras("serve") == []
        assert cli.missing_extras("demo") == ["build"]
        assert cli.main(["build", "spec"]) == 2
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "tandem build needs the build extra: pip install 'tandem[build]'"
