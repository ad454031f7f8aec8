"""Policies: the one home of every choice `trustdb run`, the engine and the service make.

model (frozen dataclasses) <- load (TOML files, checked: file:line errors, unknown keys are
errors) ; paths (a policy's patterns made concrete for one run). The shipped policies live in the
top-level policies/ folder: agent (the default of `run`), build, workstation (the service).
Import each name from its home module (trustdb.policy.model, .load, .paths); this package
re-exports nothing.
"""
