/* SPDX-License-Identifier: GPL-2.0-only */
/* The only structs that cross the kernel boundary. Mirrored field by field in trustdb/abi.py;
 * tests/engine/test_abi.py checks sizes and offsets against the BTF of the built objects.
 * Fixed-width types, explicit padding, no kernel includes. */
#ifndef __TRUSTDB_H
#define __TRUSTDB_H

#define TD_COMM_LEN 16
#define TD_PATH_LEN 256

/* Identity of one version of one inode. Any change to the file moves ctime, so a key stops
 * matching the moment the file is touched. dev is the kernel encoding (major << 20 | minor). */
struct td_inode_key {
	__u64 dev;
	__u64 ino;
	__s64 ctime_sec;
	__u32 ctime_nsec; /* without the multigrain flag bit (bit 31 on 6.13+) */
	__u32 _pad;
};

/* Where a decision was taken. */
enum td_hook {
	TD_HOOK_EXEC = 1,
	TD_HOOK_MMAP = 2,
	TD_HOOK_MPROTECT = 3,
	TD_HOOK_TAMPER = 4, /* a confined task tried to lift its confinement */
	TD_HOOK_SCRIPT = 5, /* an interpreter opened a script file (lsm) */
	TD_HOOK_WRITE = 6, /* a write to code: open for write, truncate, shared-writable map */
};

/* Why a decision was taken (td_event.reason). */
enum td_reason {
	TD_REASON_TRUSTED = 0, /* the inode key is in trusted_inodes */
	TD_REASON_UNTRUSTED = 1, /* the inode key is not in trusted_inodes */
	TD_REASON_UNVERIFIABLE = 2, /* a new executable mapping could not be inspected: fail closed */
	TD_REASON_CGROUP_ESCAPE = 3, /* a confined task moved a task out of the scope cgroup */
	TD_REASON_SIGNAL_SUPERVISOR = 4, /* a confined task signalled the supervisor */
	TD_REASON_BPF = 5, /* a confined task called bpf() (lsm) */
	TD_REASON_PTRACE = 6, /* a confined task ptraced an unconfined one (lsm) */
	TD_REASON_DB_WRITE = 7, /* a confined task wrote, moved or mounted over the trust DB (lsm) */
	TD_REASON_RAW_DEVICE = 8, /* a confined task opened a block device for writing (lsm) */
	TD_REASON_SYSCTL = 9, /* a confined task opened /proc/sys for writing (lsm) */
	TD_REASON_KERNEL_LOAD = 10, /* a confined task loaded a module, kexec image or policy (lsm) */
	TD_REASON_WRITABLE = 11, /* code that has writers right now (an fd open for write, a
				  * shared-writable mapping), or a write to trusted or mapped code */
	TD_REASON_ANON_EXEC = 12, /* code the process wrote itself: anonymous executable memory,
				   * an executable stack, W+X or written-then-executable pages */
	TD_REASON_UNTRUSTED_SCRIPT = 13, /* an interpreter opened an untrusted script (lsm) */
	TD_REASON_PROC_MEM = 14, /* a confined task opened /proc/PID/mem for writing (lsm) */
	TD_REASON_MODE_MOVE = 15, /* a task was moved into a cgroup whose service rule is audit:
				   * logged (never denied), naming the mover */
};

/* Value bits of the `program_flags` map (key: the td_inode_key of a program's executable). */
enum td_program_flag {
	TD_PROGRAM_JIT = 1, /* may use anonymous executable memory (node, java, pypy, luajit) */
	TD_PROGRAM_INTERPRETER = 2, /* may open script files only if they are trusted (lsm) */
};

/* Value bits of the lsm backend's `protected_inodes` map (key: td_inode_key, ctime zero). */
enum td_protect {
	TD_PROTECT_CONTENT = 1, /* no open for writing, no truncate (the LMDB data file) */
	TD_PROTECT_NAME = 2, /* no unlink, rename or mount over it (the DB files and directories) */
	TD_PROTECT_ENTRIES = 4, /* no unlink or rename of entries in it (the DB directory) */
};

enum td_verdict {
	TD_ALLOW = 0,
	TD_DENY = 1, /* enforce: EPERM (lsm) or SIGKILL (tracepoint) */
	TD_AUDIT_DENY = 2, /* audit mode: would have denied */
};

enum td_mode {
	TD_MODE_ENFORCE = 0,
	TD_MODE_AUDIT = 1,
};

/* Which service rule set an event's mode (td_event.mode_rule). The service's maps
 * `mode_uids` (key: __u32 uid) and `mode_cgroups` (key: __u64 cgroup v2 id) hold a __u8
 * enum td_mode each: the deepest listed ancestor of the task's cgroup wins, then its uid
 * (audit by uid needs the effective uid in audit too), then td_config.mode. */
enum td_mode_rule {
	TD_MODE_RULE_DEFAULT = 0, /* td_config.mode: the service default, or the `run` tree's mode */
	TD_MODE_RULE_UID = 1, /* mode_uids[uid] (td_event.uid) */
	TD_MODE_RULE_CGROUP = 2, /* mode_cgroups[td_event.mode_cgroup] */
};

enum td_backend {
	TD_BACKEND_TRACEPOINT = 1,
	TD_BACKEND_LSM = 2,
};

/* Value of the `confined` task storage map. Userspace writes it by pidfd to confine a task;
 * the BPF side copies it to every child at fork, so it follows the task wherever it moves. */
struct td_task {
	__u8 confined;
	__u8 _pad[7];
};

/* The one entry of the `first_seen_group` array. Userspace writes tgid and fd (the first-seen
 * handler's fanotify permission group) and runs the `find_first_seen_group` iterator, which
 * fills in group: the kernel's struct fsnotify_group, compared with mark owners (never
 * dereferenced). group == 0: no handler, no ignore mark vouches for anything. */
struct td_first_seen_group {
	__u32 tgid;
	__u32 fd;
	__u64 group;
};

/* Configuration, a `const volatile` global (`td_cfg`) set in .rodata before load. */
struct td_config {
	__u64 scope_cgroup_id; /* cgroup v2 id of the scope; 0 = the whole system */
	__u32 scope_cgroup_level; /* depth of that cgroup below the cgroup2 root */
	__u32 supervisor_tgid; /* confined tasks may not signal this process */
	__u8 mode; /* enum td_mode */
	__u8 backend; /* enum td_backend, copied into every event */
	__u8 log_allows; /* also send TD_ALLOW events (noisy; for debugging) */
	__u8 _pad[5];
};

/* One decision, sent through the ring buffer to userspace. */
struct td_event {
	__u64 time_ns; /* bpf_ktime_get_boot_ns() */
	__u32 pid;
	__u32 tgid;
	__u32 ppid;
	__u32 uid;
	struct td_inode_key file;
	__u8 hook; /* enum td_hook */
	__u8 verdict; /* enum td_verdict */
	__u8 mode; /* enum td_mode */
	__u8 backend; /* enum td_backend */
	__u32 reason; /* enum td_reason */
	char comm[TD_COMM_LEN];
	char path[TD_PATH_LEN]; /* full path where the hook can give it, else the file name */
	__u64 mode_cgroup; /* TD_MODE_RULE_CGROUP: the listed cgroup whose rule set `mode` */
	__u8 mode_rule; /* enum td_mode_rule: why `mode` is in force for this task */
	__u8 _pad[7];
};

#endif /* __TRUSTDB_H */
