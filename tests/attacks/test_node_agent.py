"""A node-based agent confined the way the README says (`trustdb run --allow-jit NODE -- agent`),
tracepoint backend: node runs with its JIT, reads the project's sources as data (policy
`read_sources`), and still cannot run an untrusted script, under its own name or any other.
The "agent" is a trusted script standing in for `claude` (a node program that reads files and
runs commands through `bash -c`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.engine.test_run import _closure, run_confined, trust_files, workdir_of

pytestmark = [pytest.mark.root, pytest.mark.bpf]

MARK = "UNTRUSTED-JS-RAN"
AGENT = """
const fs = require("fs"), cp = require("child_process");
console.log("read:", fs.readFileSync("app.js", "utf8").trim());
console.log("tool:", cp.execSync("bash -c 'echo from-bash'").toString().trim());
for (const cmd of ["node app.js", "node applink", "node /dev/fd/3 3<app.js"]) {
  try { console.log("ran:", cp.execSync(cmd, {stdio: ["ignore", "pipe", "pipe"]}).toString()); }
  catch (e) { console.log("refused:", cmd, e.status); }
}
"""


@pytest.fixture(scope="module")
def node_db(interpreters_db: Path) -> Path:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing (packaging/apt-packages.txt installs nodejs)")
    trust_files(interpreters_db, _closure([node]), label="node")
    return interpreters_db


def test_node_agent(node_db: Path, run_env: dict[str, str]) -> None:
    db = node_db
    wd = workdir_of(run_env)
    agent = wd / "agent.js"  # the agent's own code: trusted (an installed package, in life)
    agent.write_text(AGENT)
    trust_files(db, [str(agent)], label=f"agent-{wd.name}")
    (wd / "app.js").write_text(f'console.log("{MARK}");\n')
    (wd / "applink").symlink_to("app.js")
    node = shutil.which("node") or "node"
    got = run_confined(db, f"{node} {agent}", run_env, "--allow-jit", node)
    assert f'read: console.log("{MARK}");' in got.out, (got.out, got.err)
    assert "tool: from-bash" in got.out, (got.out, got.err)
    assert "ran:" not in got.out and got.out.count("refused:") == 3, (got.out, got.err)
    assert "denied script load" in got.err, got.err
