"""Policies: the one home of every choice `trustdb run`, the engine and the service make.

model (frozen dataclasses) <- load (TOML files, checked: file:line errors, unknown keys are
errors) ; paths (a policy's patterns made concrete for one run). The shipped policies live in the
top-level policies/ folder: agent (the default of `run`), build, workstation (the service).
"""

from trustdb.policy.load import DEFAULT_POLICY, PolicyError, available, find, load, load_file, parse
from trustdb.policy.model import (
    Enforcement,
    FilesystemRules,
    InterpreterRules,
    NetworkMode,
    NetworkRules,
    Policy,
    ProgramRef,
    ScriptJudgement,
    ServiceRules,
)
from trustdb.policy.paths import ResolvedFilesystem, resolve

__all__ = [
    "DEFAULT_POLICY",
    "Enforcement",
    "FilesystemRules",
    "InterpreterRules",
    "NetworkMode",
    "NetworkRules",
    "Policy",
    "PolicyError",
    "ProgramRef",
    "ResolvedFilesystem",
    "ScriptJudgement",
    "ServiceRules",
    "available",
    "find",
    "load",
    "load_file",
    "parse",
    "resolve",
]
