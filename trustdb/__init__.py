"""trustdb: a content-addressed allowlist for executable code, enforced in the kernel."""

__version__ = "0.1.0"
