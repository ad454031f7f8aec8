/* SPDX-License-Identifier: GPL-2.0-only */
/* What every trustdb BPF object shares: the maps userspace talks to, the configuration, and
 * the helpers that read an inode key (CO-RE across 6.1 .. 6.18), decide, and log a decision.
 * Include it once per .bpf.c, after nothing else. */
#ifndef __TRUSTDB_COMMON_BPF_H
#define __TRUSTDB_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "trustdb.h"

#define TD_SIGKILL 9
#define TD_VM_EXEC 0x4UL
/* Bit 31 of i_ctime_nsec is I_CTIME_QUERIED on 6.13+ (multigrain ctime); nsec itself < 2^30. */
#define TD_CTIME_NSEC_MASK 0x7fffffffU

/* Trusted inode keys, filled by the userspace mirror. max_entries is set before load. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__type(key, struct td_inode_key);
	__type(value, __u8);
} trusted_inodes SEC(".maps");

/* Decisions for userspace (struct td_event records). Size set before load. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Confined tasks. Keyed by task; userspace writes it through a pidfd. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct td_task);
} confined SEC(".maps");

/* Per-program exceptions (enum td_program_flag bits), keyed by the inode key of the program's
 * executable (mm->exe_file): JITs that may use anonymous executable memory, interpreters whose
 * script files must be trusted. Filled by userspace from the policy. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct td_inode_key);
	__type(value, __u32);
} program_flags SEC(".maps");

/* The first-seen handler's fanotify group (struct td_first_seen_group), see td_vouched_by_handler. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct td_first_seen_group);
} first_seen_group SEC(".maps");

const volatile struct td_config td_cfg = {};

/* ---- inode keys ------------------------------------------------------------------------- */

/* Local flavours of struct inode: CO-RE picks the one the running kernel has. */
struct inode___v611 { /* 6.11+: split fields */
	time64_t i_ctime_sec;
	u32 i_ctime_nsec;
} __attribute__((preserve_access_index));

struct inode___v66 { /* 6.6 .. 6.10 */
	struct timespec64 __i_ctime;
} __attribute__((preserve_access_index));

struct inode___v61 { /* up to 6.5 */
	struct timespec64 i_ctime;
} __attribute__((preserve_access_index));

static __always_inline void td_inode_key(struct inode *inode, struct td_inode_key *key)
{
	__u64 sec = 0;
	__u32 nsec = 0;

	key->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key->ino = BPF_CORE_READ(inode, i_ino);
	if (bpf_core_field_exists(struct inode___v611, i_ctime_sec)) {
		struct inode___v611 *i = (void *)inode;
		sec = BPF_CORE_READ(i, i_ctime_sec);
		nsec = BPF_CORE_READ(i, i_ctime_nsec);
	} else if (bpf_core_field_exists(struct inode___v66, __i_ctime)) {
		struct inode___v66 *i = (void *)inode;
		sec = BPF_CORE_READ(i, __i_ctime.tv_sec);
		nsec = BPF_CORE_READ(i, __i_ctime.tv_nsec);
	} else {
		struct inode___v61 *i = (void *)inode;
		sec = BPF_CORE_READ(i, i_ctime.tv_sec);
		nsec = BPF_CORE_READ(i, i_ctime.tv_nsec);
	}
	key->ctime_sec = sec;
	key->ctime_nsec = nsec & TD_CTIME_NSEC_MASK;
	key->_pad = 0;
}

static __always_inline void td_file_key(struct file *file, struct td_inode_key *key)
{
	td_inode_key(BPF_CORE_READ(file, f_inode), key);
}

static __always_inline bool td_is_trusted(const struct td_inode_key *key)
{
	return bpf_map_lookup_elem(&trusted_inodes, key) != NULL;
}

/* Flags of the program `task` runs (its mm->exe_file), 0 for none or a kernel thread. */
static __always_inline __u32 td_program_flags(struct task_struct *task)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	struct td_inode_key key;
	__u32 *flags;

	if (!exe)
		return 0;
	td_file_key(exe, &key);
	flags = bpf_map_lookup_elem(&program_flags, &key);
	return flags ? *flags : 0;
}

#include "vouch.bpf.h" /* the first-seen handler's word for an inode whose key moved */

/* Does the file have writers right now: an fd open for writing anywhere (i_writecount > 0;
 * negative while it is being executed, which refuses writers), or a shared-writable mapping
 * (i_mmap_writable > 0, whose stores never move ctime)? Its content can change under a check. */
static __always_inline bool td_file_has_writers(struct file *file)
{
	struct inode *inode = BPF_CORE_READ(file, f_inode);

	return BPF_CORE_READ(inode, i_writecount.counter) > 0 ||
	       BPF_CORE_READ(inode, i_mapping, i_mmap_writable.counter) > 0;
}

/* ---- scope ------------------------------------------------------------------------------ */

/* Is cgroup `cg` the scope cgroup or below it? */
static __always_inline bool td_cgroup_in_scope(struct cgroup *cg)
{
	__u32 level = td_cfg.scope_cgroup_level;
	struct cgroup *anc = NULL;

	if (!cg || BPF_CORE_READ(cg, level) < (int)level || level > 255)
		return false;
	bpf_core_read(&anc, sizeof(anc), &cg->ancestors[level]);
	return anc && BPF_CORE_READ(anc, kn, id) == td_cfg.scope_cgroup_id;
}

static __always_inline struct td_task *td_task_mark(struct task_struct *task, bool create)
{
	return bpf_task_storage_get(&confined, task, 0,
				    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

/* Hot-path test (runs for every task on the machine): only the mark, one storage lookup.
 * Tasks get the mark when confined by pidfd, at fork from a marked parent or into the scope
 * cgroup, when moved into the scope, at exec in the scope, and when the engine starts. */
static __always_inline bool td_task_marked(struct task_struct *task)
{
	struct td_task *t;

	if (td_cfg.scope_cgroup_id == 0)
		return true; /* system-wide service mode */
	t = td_task_mark(task, false);
	return t && t->confined;
}

/* Give `task` the confinement mark (it keeps it for life, and passes it on at fork). */
static __always_inline void td_mark_task(struct task_struct *task)
{
	struct td_task *t = td_task_mark(task, true);

	if (t)
		t->confined = 1;
}

/* Is `task` confined? A marked task always is (the mark survives cgroup moves and
 * `unshare -C`); an unmarked task in the scope cgroup is, and gets the mark from now on. */
static __always_inline bool td_task_confined(struct task_struct *task)
{
	struct td_task *t;

	if (td_cfg.scope_cgroup_id == 0)
		return true; /* system-wide service mode */
	t = td_task_mark(task, false);
	if (t && t->confined)
		return true;
	if (!td_cgroup_in_scope(BPF_CORE_READ(task, cgroups, dfl_cgrp)))
		return false;
	td_mark_task(task);
	return true;
}

#include "modes.bpf.h"

/* ---- decisions -------------------------------------------------------------------------- */

/* Fill the fields every backend sets the same way (not path: each hook knows best). */
static __always_inline void td_event_init(struct td_event *e, struct task_struct *task, __u8 hook,
					  __u8 verdict, __u32 reason,
					  const struct td_inode_key *key)
{
	e->time_ns = bpf_ktime_get_boot_ns();
	e->pid = BPF_CORE_READ(task, pid);
	e->tgid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->uid = BPF_CORE_READ(task, cred, uid.val);
	if (key)
		e->file = *key;
	else
		__builtin_memset(&e->file, 0, sizeof(e->file));
	e->hook = hook;
	e->verdict = verdict;
	/* A denial's mode is what its verdict says (td_deny chose it with td_mode_of, which left
	 * the rule in td_mode_last); no second lookup here: stack is short on 6.1. */
	e->mode = verdict == TD_AUDIT_DENY ? TD_MODE_AUDIT :
		  verdict == TD_DENY ? TD_MODE_ENFORCE : td_cfg.mode;
	e->mode_rule = TD_MODE_RULE_DEFAULT;
	e->mode_cgroup = 0;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	if (td_cfg.scope_cgroup_id == 0 && verdict != TD_ALLOW) {
		e->mode_rule = td_mode_last.rule;
		e->mode_cgroup = td_mode_last.cgroup;
	}
	e->backend = td_cfg.backend;
	e->reason = reason;
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	e->path[0] = 0;
}

/* ---- paths ------------------------------------------------------------------------------ */

#define TD_PATH_DEPTH 16 /* a power of two */

/* Where td_file_path() builds a path: twice TD_PATH_LEN, so that a write of up to TD_PATH_LEN
 * bytes at any offset below TD_PATH_LEN provably stays inside. */
struct td_path_buf {
	char buf[2 * TD_PATH_LEN];
	__u64 names[TD_PATH_DEPTH]; /* d_name.name of each component, leaf first */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct td_path_buf);
} td_path_scratch SEC(".maps");

/* State of one path walk, shared by the two bpf_loop() callbacks below. Kernel pointers are kept
 * as plain numbers: they are only ever read through BPF_CORE_READ (probe reads). The component
 * names live in td_path_scratch, not here: this struct is on td_file_path()'s stack, which is in
 * the deepest call chain of handle_mmap_unlock (6.1 counts 512 bytes for the whole chain). */
struct td_path_walk {
	__u64 dentry; /* struct dentry *: the next component to name */
	__u64 mount; /* struct mount *: the mount that dentry lives in */
	__u64 root_dentry, root_mnt; /* the task's root (chroot, pivot_root) */
	__u32 n; /* components collected */
	__u32 pos; /* bytes written to the scratch buffer */
};

/* One step up: name the dentry and go to its parent, or cross from a mount's root to the
 * dentry it is mounted on. Returns 1 to stop the walk. */
static long td_path_up(__u64 i, void *arg)
{
	struct td_path_walk *w = arg;
	struct dentry *d = (struct dentry *)w->dentry, *parent;
	struct mount *m = (struct mount *)w->mount, *mparent;
	struct td_path_buf *out;
	__u32 zero = 0;

	if (w->n >= TD_PATH_DEPTH)
		return 1;
	out = bpf_map_lookup_elem(&td_path_scratch, &zero);
	if (!out)
		return 1;
	if (w->dentry == w->root_dentry && (__u64)&m->mnt == w->root_mnt)
		return 1; /* the task's root: paths are relative to it, as d_path() makes them */
	if (d == BPF_CORE_READ(m, mnt.mnt_root)) {
		mparent = BPF_CORE_READ(m, mnt_parent);
		if (!mparent || mparent == m)
			return 1; /* the root of the mount tree */
		w->dentry = (__u64)BPF_CORE_READ(m, mnt_mountpoint);
		w->mount = (__u64)mparent;
		return 0;
	}
	parent = BPF_CORE_READ(d, d_parent);
	out->names[w->n & (TD_PATH_DEPTH - 1)] = (__u64)BPF_CORE_READ(d, d_name.name);
	w->n++;
	if (!parent || parent == d)
		return 1; /* a dentry of its own (memfd, pipe): just its name */
	w->dentry = (__u64)parent;
	return 0;
}

/* One step down: append "/<name>" for component i counted from the top. Returns 1 to stop. */
static long td_path_down(__u64 i, void *arg)
{
	struct td_path_walk *w = arg;
	struct td_path_buf *out;
	__u32 zero = 0;
	__u64 off;
	long len;

	if (i >= w->n || w->pos >= TD_PATH_LEN - 2)
		return 1;
	out = bpf_map_lookup_elem(&td_path_scratch, &zero);
	if (!out)
		return 1;
	out->buf[w->pos & (TD_PATH_LEN - 1)] = '/';
	off = w->pos + 1;
	/* Hide `off`'s range from clang, which would drop the mask the verifier needs. */
	asm volatile("" : "+r"(off));
	off &= TD_PATH_LEN - 1;
	len = bpf_probe_read_kernel_str(&out->buf[off], TD_PATH_LEN,
					(const void *)out->names[(w->n - 1 - i) & (TD_PATH_DEPTH - 1)]);
	if (len <= 1)
		return 1;
	w->pos = off + len - 1;
	return 0;
}

/* The path of `file` (a struct file *, passed as a number so this can be a global function,
 * verified once) in the per-CPU scratch buffer: its dentry names up to the root of its mount,
 * then across mount points up to the current task's root, as d_path() does without its locks.
 * Where bpf_d_path is not allowed (tracepoints, file_mprotect) this is the best the kernel side
 * can say. Deeper than TD_PATH_DEPTH components, the top is left out; longer than TD_PATH_LEN,
 * the tail is cut. Both loops are bpf_loop() callbacks (5.17+), so the verifier checks each
 * body once: unrolled, this function alone cost ~850k verified instructions on 6.18 and went
 * over the 1M limit on 6.1 and 6.12. */
__noinline int td_file_path(__u64 file_ptr)
{
	struct td_path_walk w = {};
	struct td_path_buf *out;
	struct file *file = (struct file *)file_ptr;
	struct task_struct *task;
	struct vfsmount *vfs;
	__u32 zero = 0;

	out = bpf_map_lookup_elem(&td_path_scratch, &zero);
	if (!out)
		return 0;
	task = bpf_get_current_task_btf();
	w.root_dentry = (__u64)BPF_CORE_READ(task, fs, root.dentry);
	w.root_mnt = (__u64)BPF_CORE_READ(task, fs, root.mnt);
	w.dentry = (__u64)BPF_CORE_READ(file, f_path.dentry);
	vfs = BPF_CORE_READ(file, f_path.mnt);
	w.mount = (__u64)container_of(vfs, struct mount, mnt);
	bpf_loop(TD_PATH_DEPTH + 8, td_path_up, &w, 0);
	out->buf[0] = '/';
	out->buf[1] = 0;
	bpf_loop(TD_PATH_DEPTH, td_path_down, &w, 0);
	out->buf[TD_PATH_LEN - 1] = 0;
	return w.pos;
}

/* Log one decision, with the path of `file` rebuilt from its dentries. */
static __always_inline void td_emit(struct task_struct *task, __u8 hook, __u8 verdict,
				    __u32 reason, const struct td_inode_key *key, struct file *file)
{
	struct td_path_buf *path;
	struct td_event *e;
	__u64 file_ptr = 0;
	__u32 zero = 0;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	td_event_init(e, task, hook, verdict, reason, key);
	if (file) {
		/* A global function takes scalars only: read the pointer as a plain number. */
		bpf_probe_read_kernel(&file_ptr, sizeof(file_ptr), &file);
		td_file_path(file_ptr);
		path = bpf_map_lookup_elem(&td_path_scratch, &zero);
		if (path)
			__builtin_memcpy(e->path, path->buf, sizeof(e->path));
	}
	bpf_ringbuf_submit(e, 0);
}

/* Deny what the current task is doing: SIGKILL in enforce mode (delivered before the task
 * returns to user space, so no instruction of the denied code runs), a log line in audit. */
static __always_inline __u8 td_deny(struct task_struct *task, __u8 hook, __u32 reason,
				    const struct td_inode_key *key, struct file *file)
{
	__u8 verdict = td_task_mode(task) == TD_MODE_AUDIT ? TD_AUDIT_DENY : TD_DENY;

	if (verdict == TD_DENY)
		bpf_send_signal(TD_SIGKILL);
	td_emit(task, hook, verdict, reason, key, file);
	return verdict;
}

/* Decide on one file the current task executes or maps executable: its key must be trusted
 * and nobody may be able to change its content while it runs (no writers). */
static __always_inline __u8 td_check_file(struct task_struct *task, __u8 hook, struct file *file)
{
	struct td_inode_key key;

	td_file_key(file, &key);
	if (td_file_has_writers(file))
		return td_deny(task, hook, TD_REASON_WRITABLE, &key, file);
	if (td_file_trusted(file, &key)) {
		if (td_cfg.log_allows)
			td_emit(task, hook, TD_ALLOW, TD_REASON_TRUSTED, &key, file);
		return TD_ALLOW;
	}
	return td_deny(task, hook, TD_REASON_UNTRUSTED, &key, file);
}

/* Is the current task, inside a `run` tree, allowed code it wrote itself (anonymous executable
 * memory, W+X)? Only a program flagged TD_PROGRAM_JIT is. System-wide (service mode) this rule
 * is off: every JIT on the machine would need a flag first. */
static __always_inline bool td_self_code_allowed(struct task_struct *task)
{
	return td_cfg.scope_cgroup_id == 0 || (td_program_flags(task) & TD_PROGRAM_JIT);
}

/* Code the current task wrote itself is about to run: kill it unless it is a flagged JIT. */
static __always_inline __u8 td_check_self(struct task_struct *task, __u8 hook)
{
	if (td_self_code_allowed(task))
		return TD_ALLOW;
	return td_deny(task, hook, TD_REASON_ANON_EXEC, NULL, NULL);
}

/* Service only: `moved` (moved by the current task) is now in a cgroup whose rule is audit.
 * Never denied (systemd starts services that way), but logged: pid, uid and comm are the
 * moved task's, path is the mover's comm, mode_cgroup the listed cgroup. */
static __always_inline void td_note_mode_move(struct task_struct *moved)
{
	struct td_event *e;

	if (td_cfg.scope_cgroup_id != 0 || td_task_mode(moved) != TD_MODE_AUDIT)
		return;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	td_event_init(e, moved, TD_HOOK_TAMPER, TD_AUDIT_DENY, TD_REASON_MODE_MOVE, NULL);
	if (e->mode_rule != TD_MODE_RULE_CGROUP) {
		bpf_ringbuf_discard(e, 0);
		return;
	}
	bpf_get_current_comm(e->path, TD_COMM_LEN);
	bpf_ringbuf_submit(e, 0);
}

#endif /* __TRUSTDB_COMMON_BPF_H */
