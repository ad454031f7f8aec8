"""The wheel carries the CO-RE BPF objects: build_py runs `make -C bpf` into a scratch
directory and installs every backend object as package data (trustdb/bpf/*.bpf.o), where
trustdb.backends.bpfobject.object_dir() finds them with no environment variable; and the
shipped policies (policies/*.toml -> trustdb/policies/, found by trustdb.policy.load).

Everything else about the package is in pyproject.toml. An editable install skips the build
(the source tree's build/bpf is used instead, after `make bpf`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
TEST_ONLY_OBJECTS = {"abi_check.bpf.o"}
"""Built for tests/engine/test_abi.py only; not a backend."""


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "trustdb" / "bpf"
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="trustdb-bpf-") as out:
            # OUT is the Makefile's output directory; the sources stay untouched.
            subprocess.run(["make", "-s", "-C", str(HERE / "bpf"), f"OUT={out}"], check=True)
            for obj in sorted(Path(out).glob("*.bpf.o")):
                if obj.name not in TEST_ONLY_OBJECTS:
                    shutil.copy2(obj, target / obj.name)
        if not any(target.glob("*.bpf.o")):
            raise SystemExit("setup.py: `make -C bpf` built no BPF objects")
        # The shipped policies (policies/*.toml) travel with the package, for wheel installs.
        policies = Path(self.build_lib) / "trustdb" / "policies"
        policies.mkdir(parents=True, exist_ok=True)
        for toml in sorted((HERE / "policies").glob("*.toml")):
            shutil.copy2(toml, policies / toml.name)


setup(cmdclass={"build_py": BuildPyWithBpf})
