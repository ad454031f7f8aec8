"""The workstation service: system-wide enforcement that is safe to switch on and fails closed.

    pins        the BPF links and maps pinned on bpffs, adopted by a restarted daemon
    engine      adopt-or-load, the mirror, the first-seen pre-warm, the decision ring buffer
    notify      systemd's READY/WATCHDOG/STATUS
    watch       inotify on the database: a commit reaches the kernel map at once
    preflight   what enforcing would deny that the machine or trustdb needs
    installers  files written by a trusted package manager, trusted at close
    audit       the audit-mode summary a person acts on before switching to enforce

trustdb.daemon runs them; trustdb.cli.service_commands is the `trustdb service` verb group.
"""
