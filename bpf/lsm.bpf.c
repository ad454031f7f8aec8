// SPDX-License-Identifier: GPL-2.0-only
/* The `lsm` backend: BPF LSM hooks that refuse untrusted code with EPERM before it runs.
 *
 * Needs a kernel booted with `bpf` in `lsm=` (Fedora, RHEL 9; Debian and Ubuntu when asked).
 * Shares the maps, configuration, inode keys and scope test with the tracepoint backend
 * (common.bpf.h); where that backend can only SIGKILL after the fact, these hooks answer -EPERM
 * and nothing untrusted is ever mapped or started.
 *
 * Code: bprm_check_security (every exec, and the script itself for #!), mmap_file with PROT_EXEC
 * (shared libraries, ld.so ./x, LD_PRELOAD, dlopen), file_mprotect adding PROT_EXEC to a file.
 * Code with writers (an fd open for write, a shared-writable mapping) is refused. Code a task
 * writes itself (anonymous executable memory, W+X, written-then-executable pages, an executable
 * stack) is refused in a `run` tree unless the program is flagged TD_PROGRAM_JIT; writes to
 * trusted or executable-mapped files and to /proc/PID/mem are refused there too (lsm_write.bpf.h).
 * Interpreters flagged TD_PROGRAM_INTERPRETER open only trusted script files (lsm_script.bpf.h).
 * No off switch from inside a confined tree (cgroup scope only; the whole-system service is
 * stopped by root through systemd, as any service): bpf(), signals and ptrace aimed at the
 * supervisor or at unconfined tasks, writes to the trust database and its directories, moves out
 * of the scope cgroup, module and kexec loading, sysctl and raw block device writes. */
#include "common.bpf.h"
#include "vma.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define EPERM 1
#define PROT_WRITE 0x2
#define PROT_EXEC 0x4
#define MAP_SHARED 0x01
#define MAP_SHARED_VALIDATE 0x03
#define MAP_TYPE 0x0f
#define FMODE_READ 0x1
#define FMODE_WRITE 0x2
#define S_IFMT 00170000
#define S_IFBLK 0060000
#define S_IFREG 0100000
#define PROC_SUPER_MAGIC 0x9fa0
#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270
#define PTRACE_MODE_ATTACH 0x02

/* Files and directories confined tasks may not change: the trust database, its directory and
 * that directory's ancestors. Keyed by (dev, ino) with ctime zero; value: enum td_protect bits. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct td_inode_key);
	__type(value, __u32);
} protected_inodes SEC(".maps");

/* Files (dev, ino; ctime zero) that a confined task executed or mapped executable: a confined
 * task may not write to them any more (a process that maps them would run the new bytes). An
 * LRU: past its size the oldest are forgotten (trusted files stay protected by their key). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, struct td_inode_key);
	__type(value, __u8);
} exec_inodes SEC(".maps");

/* ---- helpers ---------------------------------------------------------------------------- */

/* Send one decision. Exec and mmap can afford the full path (bpf_d_path is allowed there);
 * the other hooks give the file name. */
static __always_inline void lsm_emit(struct task_struct *task, __u8 hook, __u8 verdict,
				     __u32 reason, const struct td_inode_key *key,
				     struct file *file, bool full_path)
{
	struct td_event *e;

	if (!full_path || !file) {
		td_emit(task, hook, verdict, reason, key, file);
		return;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return;
	td_event_init(e, task, hook, verdict, reason, key);
	if (bpf_d_path((struct path *)&file->f_path, e->path, sizeof(e->path)) < 0)
		bpf_probe_read_kernel_str(e->path, sizeof(e->path),
					  BPF_CORE_READ(file, f_path.dentry, d_name.name));
	bpf_ringbuf_submit(e, 0);
}

/* The answer to a denied request: EPERM in enforce mode, allow (and log) in audit mode. */
static __always_inline int lsm_deny(struct task_struct *task, __u8 hook, __u32 reason,
				    const struct td_inode_key *key, struct file *file,
				    bool full_path)
{
	bool audit = td_task_mode(task) == TD_MODE_AUDIT;

	lsm_emit(task, hook, audit ? TD_AUDIT_DENY : TD_DENY, reason, key, file, full_path);
	return audit ? 0 : -EPERM;
}

/* (dev, ino) of an inode, ctime zero: the key of protected_inodes and exec_inodes. */
static __always_inline void lsm_inode_ident(struct inode *inode, struct td_inode_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key->ino = BPF_CORE_READ(inode, i_ino);
}

/* Decide on a file the current task executes or maps executable: trusted content that nobody
 * can change while it runs (no writers). Allowed files are remembered in exec_inodes. */
static __always_inline int lsm_check_code(__u8 hook, struct file *file, bool full_path)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_inode_key key;
	__u8 one = 1;

	if (!td_task_confined(task))
		return 0;
	td_file_key(file, &key);
	if (td_file_has_writers(file))
		return lsm_deny(task, hook, TD_REASON_WRITABLE, &key, file, full_path);
	if (!td_file_trusted(file, &key))
		return lsm_deny(task, hook, TD_REASON_UNTRUSTED, &key, file, full_path);
	if (td_cfg.log_allows)
		lsm_emit(task, hook, TD_ALLOW, TD_REASON_TRUSTED, &key, file, full_path);
	if (td_cfg.scope_cgroup_id) {
		lsm_inode_ident(BPF_CORE_READ(file, f_inode), &key);
		bpf_map_update_elem(&exec_inodes, &key, &one, BPF_ANY);
	}
	return 0;
}

/* Code the current task wrote itself: EPERM unless the program is a flagged JIT. */
static __always_inline int lsm_check_self(__u8 hook)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!td_task_confined(task) || td_self_code_allowed(task))
		return 0;
	return lsm_deny(task, hook, TD_REASON_ANON_EXEC, NULL, NULL, false);
}

/* Tamper checks apply to tasks confined to a cgroup scope, never to the supervisor itself. */
static __always_inline bool lsm_guarded(struct task_struct *task)
{
	if (td_cfg.scope_cgroup_id == 0)
		return false;
	if (td_cfg.supervisor_tgid && BPF_CORE_READ(task, tgid) == td_cfg.supervisor_tgid)
		return false;
	return td_task_confined(task);
}

static __always_inline int lsm_tamper(__u32 reason, struct file *file)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!lsm_guarded(task))
		return 0;
	return lsm_deny(task, TD_HOOK_TAMPER, reason, NULL, file, false);
}

static __always_inline __u32 lsm_protection(struct inode *inode)
{
	struct td_inode_key key = {};
	__u32 *flags;

	if (!inode)
		return 0;
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key.ino = BPF_CORE_READ(inode, i_ino);
	flags = bpf_map_lookup_elem(&protected_inodes, &key);
	return flags ? *flags : 0;
}

static __always_inline bool lsm_name_is(struct dentry *d, const char *want, int len)
{
	char name[16] = {};

	if (len > (int)sizeof(name) - 1)
		return false;
	bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ(d, d_name.name));
	for (int i = 0; i < len + 1 && i < (int)sizeof(name); i++)
		if (name[i] != want[i])
			return false;
	return true;
}

/* Is this a file under /proc/sys, wherever procfs is mounted? Walks up to its top-level dir. */
static __always_inline bool lsm_is_sysctl(struct dentry *d)
{
	for (int i = 0; i < 8; i++) {
		struct dentry *parent = BPF_CORE_READ(d, d_parent);

		if (!parent || parent == d)
			return false;
		if (BPF_CORE_READ(parent, d_parent) == parent)
			return lsm_name_is(d, "sys", 3);
		d = parent;
	}
	return false;
}

/* A write to cgroup.procs / cgroup.threads that would move a task into a cgroup outside the
 * scope. cgroup v1 has no scope here: any move through it is refused. */
static __always_inline bool lsm_is_cgroup_escape(struct dentry *d, unsigned long magic)
{
	struct kernfs_node *dir_kn;
	struct cgroup *cg;

	if (!lsm_name_is(d, "cgroup.procs", 12) && !lsm_name_is(d, "cgroup.threads", 14) &&
	    !lsm_name_is(d, "tasks", 5))
		return false;
	if (magic != CGROUP2_SUPER_MAGIC)
		return true;
	dir_kn = BPF_CORE_READ(d, d_parent, d_inode, i_private); /* kernfs keeps its node there */
	cg = dir_kn ? (struct cgroup *)BPF_CORE_READ(dir_kn, priv) : NULL;
	return !td_cgroup_in_scope(cg);
}

#include "lsm_write.bpf.h"
#include "lsm_script.bpf.h"

/* ---- code: exec, mmap, mprotect ---------------------------------------------------------- */

/* Called for every binary the exec walks through: a #! script, then its interpreter. */
SEC("lsm/bprm_check_security")
int BPF_PROG(handle_exec, struct linux_binprm *bprm, int ret)
{
	if (ret)
		return ret;
	return lsm_check_code(TD_HOOK_EXEC, bprm->file, true); /* a BTF pointer, for bpf_d_path */
}

static __always_inline bool lsm_is_anon_shared_file(struct file *file)
{
	return lsm_name_is(BPF_CORE_READ(file, f_path.dentry), "dev/zero", 8);
}

static __always_inline bool lsm_is_char_device(struct file *file)
{
	return (BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) == TD_S_IFCHR;
}

/* Every new mapping: executable ones (including the kernel's own mapping of the binary and
 * ld.so) by what they run, shared-writable ones as writes to code. */
SEC("lsm/mmap_file")
int BPF_PROG(handle_mmap, struct file *file, unsigned long reqprot, unsigned long prot,
	     unsigned long flags, int ret)
{
	bool shared = (flags & MAP_TYPE) == MAP_SHARED || (flags & MAP_TYPE) == MAP_SHARED_VALIDATE;

	if (ret)
		return ret;
	if (file && shared && (prot & PROT_WRITE)) {
		ret = lsm_check_write(file, BPF_CORE_READ(file, f_inode));
		if (ret)
			return ret;
	}
	if (!(prot & PROT_EXEC))
		return 0;
	/* Anonymous memory, shared or not, and devices such as /dev/zero: the task's own bytes.
	 * A private file mapping that is writable too is as good as anonymous (W+X). SysV SHM_EXEC
	 * and memfds come here as files nobody trusts. */
	if (!file || lsm_is_char_device(file) || ((prot & PROT_WRITE) && !shared))
		return lsm_check_self(TD_HOOK_MMAP);
	return lsm_check_code(TD_HOOK_MMAP, file, true);
}

/* mprotect: PROT_EXEC added to a file mapping made without it (bpf_d_path is not allowed
 * here), or to memory the task wrote itself (anonymous, copy-on-write pages of a file, W+X);
 * PROT_WRITE added to a shared mapping of code. */
SEC("lsm/file_mprotect")
int BPF_PROG(handle_mprotect, struct vm_area_struct *vma, unsigned long reqprot,
	     unsigned long prot, int ret)
{
	unsigned long vm_flags = BPF_CORE_READ(vma, vm_flags);
	struct file *file = BPF_CORE_READ(vma, vm_file);

	if (ret)
		return ret;
	if (file && (vm_flags & TD_VM_SHARED) && (prot & PROT_WRITE)) {
		ret = lsm_check_write(file, BPF_CORE_READ(file, f_inode));
		if (ret)
			return ret;
	}
	if (!(prot & PROT_EXEC))
		return 0;
	if (!file) /* special mappings (vdso) have vm_ops: the kernel's own code */
		return BPF_CORE_READ(vma, vm_ops) ? 0 : lsm_check_self(TD_HOOK_MPROTECT);
	if (lsm_is_anon_shared_file(file) || lsm_is_char_device(file))
		return lsm_check_self(TD_HOOK_MPROTECT);
	if ((prot & PROT_WRITE) && !(vm_flags & TD_VM_SHARED))
		return lsm_check_self(TD_HOOK_MPROTECT);
	if (vm_flags & TD_VM_EXEC)
		return 0; /* already checked when it was mapped */
	if (BPF_CORE_READ(vma, anon_vma))
		return lsm_check_self(TD_HOOK_MPROTECT); /* written, then made executable */
	return lsm_check_code(TD_HOOK_MPROTECT, file, false);
}

/* An executable stack (-z execstack) or any other anonymous executable VMA of a new image.
 * There is no LSM hook between the stack's setup and the first instruction: this is found
 * after the point of no return, so it is a SIGKILL, as on the tracepoint backend. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(handle_exec_image, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!td_cfg.scope_cgroup_id || !td_task_confined(task) || td_self_code_allowed(task))
		return 0;
	td_check_image(task, bprm->file, false);
	return 0;
}

/* ---- no off switch ----------------------------------------------------------------------- */

/* The mark follows every child and thread, whatever cgroup or namespace it moves to. */
/* The service logs moves into cgroups whose rule is audit (td_note_mode_move). */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(handle_cgroup_attach, struct cgroup *dst, const char *path, struct task_struct *moved,
	     bool threadgroup)
{
	td_note_mode_move(moved);
	return 0;
}

SEC("lsm/task_alloc")
int BPF_PROG(handle_task_alloc, struct task_struct *task, unsigned long clone_flags, int ret)
{
	struct td_task *child;

	if (ret || td_cfg.scope_cgroup_id == 0)
		return ret;
	if (!td_task_confined(bpf_get_current_task_btf()))
		return 0;
	child = td_task_mark(task, true);
	if (child)
		child->confined = 1;
	return 0;
}

/* No bpf() at all: no detaching, no map edits, no programs of its own. */
SEC("lsm/bpf")
int BPF_PROG(handle_bpf, int cmd, union bpf_attr *attr, unsigned int size, int ret)
{
	if (ret)
		return ret;
	return lsm_tamper(TD_REASON_BPF, NULL);
}

/* No signal (kill, stop, pidfd_send_signal) to the supervisor. */
SEC("lsm/task_kill")
int BPF_PROG(handle_kill, struct task_struct *p, struct kernel_siginfo *info, int sig,
	     const struct cred *cred, int ret)
{
	if (ret)
		return ret;
	if (!sig || !td_cfg.supervisor_tgid || BPF_CORE_READ(p, tgid) != td_cfg.supervisor_tgid)
		return 0;
	return lsm_tamper(TD_REASON_SIGNAL_SUPERVISOR, NULL);
}

/* No ptrace attach, /proc/PID/mem, process_vm_writev or pidfd_getfd into a task outside the
 * confined tree: that would run code unconfined. Read access (ps, /proc/PID/stat) stays. */
SEC("lsm/ptrace_access_check")
int BPF_PROG(handle_ptrace, struct task_struct *child, unsigned int mode, int ret)
{
	if (ret)
		return ret;
	if (!(mode & PTRACE_MODE_ATTACH) || td_task_confined(child))
		return 0;
	return lsm_tamper(TD_REASON_PTRACE, NULL);
}

/* Opens for writing: the trust database, raw block devices (the filesystem under it),
 * /proc/sys (core_pattern and modprobe run helpers outside any cgroup), cgroup moves, code
 * (trusted or mapped executable), /proc/PID/mem. Opens for reading: scripts (lsm_script.bpf.h). */
SEC("lsm/file_open")
int BPF_PROG(handle_open, struct file *file, int ret)
{
	struct inode *inode;
	struct dentry *dentry;
	unsigned long magic;
	unsigned int f_mode;
	__u32 reason = 0;

	if (ret)
		return ret;
	f_mode = BPF_CORE_READ(file, f_mode);
	if (!(f_mode & FMODE_WRITE))
		return (f_mode & FMODE_READ) ? lsm_check_script(file) : 0;
	inode = BPF_CORE_READ(file, f_inode);
	dentry = BPF_CORE_READ(file, f_path.dentry);
	magic = BPF_CORE_READ(inode, i_sb, s_magic);
	if (lsm_protection(inode) & TD_PROTECT_CONTENT)
		reason = TD_REASON_DB_WRITE;
	else if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) == S_IFBLK)
		reason = TD_REASON_RAW_DEVICE;
	else if (magic == PROC_SUPER_MAGIC && lsm_is_sysctl(dentry))
		reason = TD_REASON_SYSCTL;
	else if ((magic == CGROUP2_SUPER_MAGIC || magic == CGROUP_SUPER_MAGIC) &&
		 lsm_is_cgroup_escape(dentry, magic))
		reason = TD_REASON_CGROUP_ESCAPE;
	if (reason)
		return lsm_tamper(reason, file);
	if (magic == PROC_SUPER_MAGIC && lsm_name_is(dentry, "mem", 3))
		return lsm_write_denied(TD_REASON_PROC_MEM, NULL, file);
	return lsm_check_write(file, inode);
}

SEC("lsm/path_truncate")
int BPF_PROG(handle_truncate, const struct path *path, int ret)
{
	struct inode *inode;

	if (ret)
		return ret;
	inode = BPF_CORE_READ(path, dentry, d_inode);
	if (lsm_protection(inode) & TD_PROTECT_CONTENT)
		return lsm_tamper(TD_REASON_DB_WRITE, NULL);
	return lsm_check_write(NULL, inode);
}

/* Protected names: the database files and every directory from / down to the database. */
static __always_inline bool lsm_name_protected(struct inode *dir, struct dentry *dentry)
{
	return (lsm_protection(dir) & TD_PROTECT_ENTRIES) ||
	       (lsm_protection(BPF_CORE_READ(dentry, d_inode)) & TD_PROTECT_NAME);
}

SEC("lsm/inode_unlink")
int BPF_PROG(handle_unlink, struct inode *dir, struct dentry *dentry, int ret)
{
	if (ret || !lsm_name_protected(dir, dentry))
		return ret;
	return lsm_tamper(TD_REASON_DB_WRITE, NULL);
}

SEC("lsm/inode_rename")
int BPF_PROG(handle_rename, struct inode *old_dir, struct dentry *old_dentry,
	     struct inode *new_dir, struct dentry *new_dentry, int ret)
{
	if (ret)
		return ret;
	if (!lsm_name_protected(old_dir, old_dentry) && !lsm_name_protected(new_dir, new_dentry))
		return 0;
	return lsm_tamper(TD_REASON_DB_WRITE, NULL);
}

/* Mounting over the database or one of its directories would hide it from the supervisor. */
SEC("lsm/sb_mount")
int BPF_PROG(handle_mount, const char *dev_name, const struct path *path, const char *type,
	     unsigned long flags, void *data, int ret)
{
	if (ret || !lsm_protection(BPF_CORE_READ(path, dentry, d_inode)))
		return ret;
	return lsm_tamper(TD_REASON_DB_WRITE, NULL);
}

SEC("lsm/move_mount")
int BPF_PROG(handle_move_mount, const struct path *from, const struct path *to, int ret)
{
	if (ret || !lsm_protection(BPF_CORE_READ(to, dentry, d_inode)))
		return ret;
	return lsm_tamper(TD_REASON_DB_WRITE, NULL);
}

/* No kernel modules, kexec images or IMA policies from a confined task; firmware is the
 * driver's business. */
SEC("lsm/kernel_read_file")
int BPF_PROG(handle_kernel_read_file, struct file *file, enum kernel_read_file_id id,
	     bool contents, int ret)
{
	if (ret || id == READING_FIRMWARE)
		return ret;
	return lsm_tamper(TD_REASON_KERNEL_LOAD, NULL);
}

SEC("lsm/kernel_load_data")
int BPF_PROG(handle_kernel_load_data, enum kernel_load_data_id id, bool contents, int ret)
{
	if (ret || id == LOADING_FIRMWARE)
		return ret;
	return lsm_tamper(TD_REASON_KERNEL_LOAD, NULL);
}
