// SPDX-License-Identifier: GPL-2.0-only
/* trustdb's `tracepoint` backend, for kernels without BPF LSM (and without fentry).
 *
 * Tracepoints cannot return an error, so a denial is SIGKILL, sent from a point where the task
 * has not yet run a single instruction of the denied code:
 *   exec      tp_btf/sched_process_exec: bprm->file, after the point of no return, before the
 *             first user instruction; plus every executable mapping of the new image (the ELF
 *             interpreter named by PT_INTERP wherever it lies, an executable stack).
 *   mmap,     tp_btf/mmap_lock_released: the mapping the kernel actually made, read from the
 *   mprotect  task's VMA tree as mmap()/mprotect() releases mmap_lock, still inside the
 *             syscall (no race with a thread that swaps the fd). Syscall tracepoints would tax
 *             every syscall of every task; these two fire only on mmap_lock use and
 *             vm_unmapped_area (address search for a new mapping).
 *   code the  anonymous executable memory, W+X, written-then-executable pages, SysV SHM_EXEC,
 *   task      READ_IMPLIES_EXEC: killed unless the program is flagged TD_PROGRAM_JIT.
 *   wrote
 *   writes    exec or an executable mapping of a file that has writers; a shared-writable
 *             mapping of a trusted file (write opens are refused by the fanotify side).
 *   tamper    tp_btf/cgroup_attach_task, tp_btf/signal_generate: a confined task moving a task
 *             out of the scope, or signalling the supervisor, is killed.
 * Confinement is a mark in task storage, copied to children at tp_btf/sched_process_fork.
 */
#include "common.bpf.h"
#include "vma.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define barrier() asm volatile("" ::: "memory")
#define TD_PROT_READ 0x1
#define TD_PROT_EXEC 0x4
#define TD_PROT_WRITE 0x2
#define TD_MAP_TYPE 0x0f
#define TD_MAP_SHARED 0x01
#define TD_MAP_SHARED_VALIDATE 0x03
#define TD_MAP_FIXED 0x10
#define TD_MAP_ANONYMOUS 0x20
#define TD_MAP_FIXED_NOREPLACE 0x100000
#define TD_READ_IMPLIES_EXEC 0x0400000
#define TD_TS_COMPAT 0x0002
#define TD_X32_SYSCALL_BIT 0x40000000UL
#define TD_SHM_EXEC 0100000

/* x86_64 syscall numbers that can make an executable file mapping. */
#define TD_NR_MMAP 9
#define TD_NR_MPROTECT 10
#define TD_NR_SHMAT 30
#define TD_NR_REMAP_FILE_PAGES 216
#define TD_NR_PKEY_MPROTECT 329
/* ... and their ia32 (int 0x80) numbers: any of those gets a full scan. */
#define TD_NR32_OLD_MMAP 90
#define TD_NR32_MPROTECT 125
#define TD_NR32_MMAP2 192
#define TD_NR32_REMAP_FILE_PAGES 257
#define TD_NR32_PKEY_MPROTECT 380
#define TD_NR32_IPC 117
#define TD_NR32_SHMAT 397

/* The last address search (vm_unmapped_area) of a confined task, and the syscall that made it.
 * Spent at every mmap_lock write release of the task, whatever the syscall: only a search made
 * by the mmap() releasing the lock now may say where its mapping is (a stale record, say from
 * an mremap(MREMAP_MAYMOVE), points at some other mapping). A new mapping lies inside the
 * searched range (THP alignment pads the search, never moves outside it). */
struct td_mmap_area {
	__u64 start;
	__u64 len;
	__u64 nr; /* the syscall that searched */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct td_mmap_area);
} mmap_area SEC(".maps");

/* A write to code: a shared-writable mapping of a trusted file. Its stores change the content
 * without moving ctime, so the key would go on matching other bytes. */
static __always_inline __u8 td_check_write(struct task_struct *task, struct file *file)
{
	struct td_inode_key key;

	td_file_key(file, &key);
	if (!td_is_trusted(&key))
		return TD_ALLOW;
	return td_deny(task, TD_HOOK_WRITE, TD_REASON_WRITABLE, &key, file);
}

static __always_inline bool td_vma_shared_writable(struct vm_area_struct *vma)
{
	return (BPF_CORE_READ(vma, vm_flags) & (TD_VM_SHARED | TD_VM_WRITE)) ==
	       (TD_VM_SHARED | TD_VM_WRITE);
}

/* Judge one VMA the current task has just made or changed: executable ones by what they run
 * (a file, or code the task wrote itself: `written` also counts copy-on-write pages, for
 * mprotect), and shared-writable ones as writes to code. */
static __always_inline __u8 td_check_vma(struct task_struct *task, int hook,
					 struct vm_area_struct *vma, bool written)
{
	struct file *file;
	int code = td_vma_code(vma, &file, written);
	__u8 verdict = TD_ALLOW;

	if (code == TD_CODE_SELF)
		verdict = td_check_self(task, hook);
	else if (code == TD_CODE_FILE)
		verdict = td_check_file(task, hook, file);
	if (verdict != TD_ALLOW)
		return verdict;
	file = BPF_CORE_READ(vma, vm_file);
	if (file && td_vma_shared_writable(vma))
		return td_check_write(task, file);
	return TD_ALLOW;
}

#define TD_MAX_RUN 64

/* One step of td_check_run: judge the mapping at `*addr` if it starts below `end`, and move
 * `*addr` to its end. Returns -1 if no mapping there starts below `end`, else the verdict.
 * A global function: the verifier checks it once, not once per iteration of the walk (the
 * walk inlined it 64 times: 290k instructions verified, 0.27 s of every `trustdb run`). */
__noinline int td_check_run_step(int hook, __u64 end, __u64 *addr)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct vm_area_struct *vma;
	int verdict;

	if (!addr)
		return -1;
	vma = td_vma_lookup(task->mm, *addr);
	if (!vma || BPF_CORE_READ(vma, vm_start) >= end)
		return -1;
	verdict = td_check_vma(task, hook, vma, hook == TD_HOOK_MPROTECT);
	*addr = BPF_CORE_READ(vma, vm_end);
	return verdict;
}

/* Check the run of adjacent mappings of the current task that starts at `addr` and overlaps
 * [addr, end) (an mprotect, remap_file_pages). Returns -1 if no mapping is at `addr`, else
 * the verdict (TD_ALLOW when all passed). A global function: verified once. */
__noinline int td_check_run(int hook, __u64 addr, __u64 end)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u64 next = addr;
	int i, verdict;

	for (i = 0; i < TD_MAX_RUN; i++) {
		verdict = td_check_run_step(hook, end, &next);
		if (verdict < 0)
			return i == 0 ? -1 : TD_ALLOW;
		if (verdict != TD_ALLOW)
			return verdict;
		if (next >= end)
			return TD_ALLOW;
	}
	/* A range with more mappings than we walk (an mprotect over a huge area): fail closed. */
	return td_deny(task, hook, TD_REASON_UNVERIFIABLE, NULL, NULL);
}

/* The file behind `fd` in the current task (NULL if none). */
static __always_inline struct file *td_fd_file(struct task_struct *task, __u64 fd)
{
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	unsigned int max = BPF_CORE_READ(task, files, fdt, max_fds);
	struct file *file = NULL;

	if (fd < max)
		bpf_core_read(&file, sizeof(file), &fds[fd]);
	return file;
}

/* The mmap() that releases mmap_lock now: find the mapping it made and judge it.
 * Where it is: MAP_FIXED's address; else this call's own address search (its start, or that
 * moved up to the file offset's 2 MiB alignment by THP placement); else (no search: the hint
 * was free) the hint. A file mapping found there must be backed by the very file of the fd
 * passed to mmap, or we are looking at the wrong mapping (or the fd was swapped): fail closed.
 * No mapping there: the mmap failed (a noexec mount, an EPERM); the fd's file is judged anyway,
 * and anonymous memory that was not mapped is no code. A global function (scalars only): its
 * own stack frame keeps the call chain below the verifier's 512 bytes on 6.1. */
__noinline int td_check_mmap(__u64 rec_start, __u64 rec_len, __u64 rec_nr)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	__u64 prot = BPF_CORE_READ(regs, dx), flags = BPF_CORE_READ(regs, r10);
	__u64 start = BPF_CORE_READ(regs, di), end = start + BPF_CORE_READ(regs, si);
	__u64 off = BPF_CORE_READ(regs, r9), cand[2] = {};
	bool anon = flags & TD_MAP_ANONYMOUS, exec = prot & TD_PROT_EXEC;
	bool shared_write = !anon && (prot & TD_PROT_WRITE) &&
			    ((flags & TD_MAP_TYPE) == TD_MAP_SHARED ||
			     (flags & TD_MAP_TYPE) == TD_MAP_SHARED_VALIDATE);
	struct vm_area_struct *vma = NULL;
	struct file *file = NULL, *vm_file;
	int i;

	if (!exec && !shared_write)
		return 0;
	if (flags & (TD_MAP_FIXED | TD_MAP_FIXED_NOREPLACE)) {
		cand[0] = start;
	} else if (rec_len && rec_nr == TD_NR_MMAP) {
		cand[0] = rec_start;
		cand[1] = rec_start + ((off - rec_start) & 0x1fffffULL);
		end = rec_start + rec_len;
	} else {
		cand[0] = start & ~0xfffULL;
	}
	for (i = 0; i < 2; i++) {
		if (!cand[i] || cand[i] >= end)
			continue;
		vma = td_vma_lookup(task->mm, cand[i]);
		if (vma && BPF_CORE_READ(vma, vm_start) < end)
			break;
		vma = NULL;
	}
	if (!anon)
		file = td_fd_file(task, BPF_CORE_READ(regs, r8));
	if (!vma) {
		if (anon)
			return 0;
		if (!file)
			return td_deny(task, TD_HOOK_MMAP, TD_REASON_UNVERIFIABLE, NULL, NULL);
		if (exec)
			return td_check_file(task, TD_HOOK_MMAP, file);
		return td_check_write(task, file);
	}
	vm_file = BPF_CORE_READ(vma, vm_file);
	/* /dev/zero and other devices may put their own file (or none) in the VMA: what such a
	 * mapping runs is the task's own code, whatever the VMA holds. */
	if (!anon && vm_file != file && !(file && td_is_char_device(file)))
		return td_deny(task, TD_HOOK_MMAP, TD_REASON_UNVERIFIABLE, NULL, file);
	return td_check_vma(task, TD_HOOK_MMAP, vma, false);
}

/* Confinement is inherited: mark the child before it first runs. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(handle_fork, struct task_struct *parent, struct task_struct *child)
{
	struct td_task *t;

	if (td_cfg.scope_cgroup_id == 0)
		return 0;
	t = td_task_mark(parent, false);
	if (!(t && t->confined) &&
	    !td_cgroup_in_scope(BPF_CORE_READ(child, cgroups, dfl_cgrp)))
		return 0;
	td_mark_task(child);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(handle_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!td_task_confined(task))
		return 0;
	if (td_check_file(task, TD_HOOK_EXEC, bprm->file) == TD_DENY)
		return 0;
	/* The binary passed; now every other executable mapping the kernel made for it. */
	td_check_image(task, bprm->file, true);
	return 0;
}

/* Remember where mmap() is placing its new mapping (only for confined tasks). */
SEC("tp_btf/vm_unmapped_area")
int BPF_PROG(handle_unmapped_area, unsigned long addr, struct vm_unmapped_area_info *info)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_mmap_area *area;
	struct pt_regs *regs;

	if (!td_task_marked(task))
		return 0;
	area = bpf_task_storage_get(&mmap_area, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!area)
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	area->start = addr;
	area->len = info->length;
	area->nr = BPF_CORE_READ(regs, orig_ax) & ~TD_X32_SYSCALL_BIT;
	return 0;
}

/* Before 6.13 the mmap_lock tracepoints also passed the memcg path: (mm, memcg_path, write). */
struct trace_event_raw_mmap_lock___memcg_path {
	u32 __data_loc_memcg_path;
} __attribute__((preserve_access_index));

SEC("tp_btf/mmap_lock_released")
int handle_mmap_unlock(__u64 *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = (struct mm_struct *)ctx[0];
	__u64 rec_start = 0, rec_len = 0, rec_nr = 0;
	struct td_mmap_area *area;
	struct pt_regs *regs;
	__u64 nr, prot, start, end;
	bool write, compat;

	/* Two separate constant-offset loads: the verifier refuses a computed ctx offset. */
	if (bpf_core_field_exists(struct trace_event_raw_mmap_lock___memcg_path,
				  __data_loc_memcg_path)) {
		write = *(volatile __u64 *)&ctx[2];
		barrier();
	} else {
		write = *(volatile __u64 *)&ctx[1];
	}
	/* Cheap filters first: this runs for every mmap_lock write release on the machine. */
	if (!write || !td_task_marked(task) || task->mm != mm)
		return 0;
	area = bpf_task_storage_get(&mmap_area, task, 0, 0);
	if (area) {
		rec_start = area->start;
		rec_len = area->len;
		rec_nr = area->nr;
		area->len = 0; /* spent, whatever this syscall is */
	}
	/* READ_IMPLIES_EXEC (personality) makes every new private mapping and the heap (brk)
	 * executable: memory the task writes itself. */
	if (task->personality & TD_READ_IMPLIES_EXEC) {
		td_check_self(task, TD_HOOK_MMAP);
		return 0;
	}
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = BPF_CORE_READ(regs, orig_ax) & ~TD_X32_SYSCALL_BIT;
	compat = task->thread_info.status & TD_TS_COMPAT;
	if (compat) {
		/* ia32 syscalls from a 64-bit process: an escape hatch, not a use case. */
		if (nr == TD_NR32_OLD_MMAP || nr == TD_NR32_MMAP2 || nr == TD_NR32_MPROTECT ||
		    nr == TD_NR32_PKEY_MPROTECT || nr == TD_NR32_REMAP_FILE_PAGES ||
		    nr == TD_NR32_IPC || nr == TD_NR32_SHMAT)
			td_deny(task, TD_HOOK_MMAP, TD_REASON_UNVERIFIABLE, NULL, NULL);
		return 0;
	}
	if (nr == TD_NR_MMAP) {
		td_check_mmap(rec_start, rec_len, rec_nr);
		return 0;
	}
	if (nr == TD_NR_SHMAT) {
		/* SysV shared memory attached executable: its content is whatever processes wrote. */
		if (BPF_CORE_READ(regs, dx) & TD_SHM_EXEC)
			td_check_self(task, TD_HOOK_MMAP);
		return 0;
	}
	if (nr != TD_NR_MPROTECT && nr != TD_NR_PKEY_MPROTECT && nr != TD_NR_REMAP_FILE_PAGES)
		return 0;
	prot = BPF_CORE_READ(regs, dx);
	start = BPF_CORE_READ(regs, di) & ~0xfffULL;
	end = BPF_CORE_READ(regs, di) + BPF_CORE_READ(regs, si);
	if (nr == TD_NR_REMAP_FILE_PAGES) {
		td_check_run(TD_HOOK_MMAP, start, end);
		return 0;
	}
	/* mprotect / pkey_mprotect: the kernel changed [start, end) from `start` upwards. */
	if (prot & (TD_PROT_EXEC | TD_PROT_WRITE))
		td_check_run(TD_HOOK_MPROTECT, start, end);
	return 0;
}

/* Tamper: a confined task moving a task (itself, usually) out of the scope cgroup. The mark
 * keeps the moved task confined anyway; the mover is killed for trying. Moving a task into
 * the scope confines it. */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(handle_cgroup_attach, struct cgroup *dst, const char *path, struct task_struct *moved,
	     bool threadgroup)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_task *t;

	if (td_cfg.scope_cgroup_id == 0) {
		td_note_mode_move(moved);
		return 0;
	}
	if (td_cgroup_in_scope(dst)) {
		td_mark_task(moved);
		return 0;
	}
	t = td_task_mark(task, false);
	if (t && t->confined)
		td_deny(task, TD_HOOK_TAMPER, TD_REASON_CGROUP_ESCAPE, NULL, NULL);
	return 0;
}

/* Tamper: a confined task sending a signal to the supervisor (kernel-generated signals such
 * as SIGCHLD are fine). The signal itself is not stopped here: the supervisor also hides
 * in another pid namespace; this kills the sender and leaves a record. */
SEC("tp_btf/signal_generate")
int BPF_PROG(handle_signal, int sig, struct kernel_siginfo *info, struct task_struct *target,
	     int group, int result)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_task *t;
	int code;

	if (!td_cfg.supervisor_tgid || !sig || target->tgid != td_cfg.supervisor_tgid)
		return 0;
	if ((unsigned long)info == 1) /* SEND_SIG_PRIV: from the kernel */
		return 0;
	if (info) {
		code = BPF_CORE_READ(info, si_code);
		if (code > 0) /* SI_KERNEL, CLD_*: from the kernel */
			return 0;
	}
	t = td_task_mark(task, false);
	if (t && t->confined)
		td_deny(task, TD_HOOK_TAMPER, TD_REASON_SIGNAL_SUPERVISOR, NULL, NULL);
	return 0;
}
