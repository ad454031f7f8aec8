// SPDX-License-Identifier: GPL-2.0-only
/* trustdb's `tracepoint` backend, for kernels without BPF LSM (and without fentry).
 *
 * Tracepoints cannot return an error, so a denial is SIGKILL, sent from a point where the task
 * has not yet run a single instruction of the denied code:
 *   exec      tp_btf/sched_process_exec: bprm->file, after the point of no return, before the
 *             first user instruction; plus every executable file mapping of the new image
 *             (the ELF interpreter named by PT_INTERP).
 *   mmap,     tp_btf/mmap_lock_released: the mapping the kernel actually made, read from the
 *   mprotect  task's VMAs right after mmap()/mprotect() dropped mmap_lock, still inside the
 *             syscall (no race with a thread that swaps the fd). Syscall tracepoints would tax
 *             every syscall of every task; these two fire only on mmap_lock use and
 *             vm_unmapped_area (address search for a new mapping).
 *   tamper    tp_btf/cgroup_attach_task, tp_btf/signal_generate: a confined task moving a task
 *             out of the scope, or signalling the supervisor, is killed.
 * Confinement is a mark in task storage, copied to children at tp_btf/sched_process_fork.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define TD_PROT_READ 0x1
#define TD_PROT_EXEC 0x4
#define TD_MAP_FIXED 0x10
#define TD_MAP_FIXED_NOREPLACE 0x100000
#define TD_READ_IMPLIES_EXEC 0x0400000
#define TD_TS_COMPAT 0x0002
#define TD_X32_SYSCALL_BIT 0x40000000UL

/* x86_64 syscall numbers that can make an executable file mapping. */
#define TD_NR_MMAP 9
#define TD_NR_MPROTECT 10
#define TD_NR_REMAP_FILE_PAGES 216
#define TD_NR_PKEY_MPROTECT 329
/* ... and their ia32 (int 0x80) numbers: any of those gets a full scan. */
#define TD_NR32_OLD_MMAP 90
#define TD_NR32_MPROTECT 125
#define TD_NR32_MMAP2 192
#define TD_NR32_REMAP_FILE_PAGES 257
#define TD_NR32_PKEY_MPROTECT 380

/* Range of the last address search of the current mmap() (vm_unmapped_area), per task.
 * A new mapping lies inside it (THP alignment pads the search, never moves outside it). */
struct td_mmap_area {
	__u64 start;
	__u64 len;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct td_mmap_area);
} mmap_area SEC(".maps");

extern int bpf_iter_task_vma_new(struct bpf_iter_task_vma *it, struct task_struct *task,
				 __u64 addr) __ksym;
extern struct vm_area_struct *bpf_iter_task_vma_next(struct bpf_iter_task_vma *it) __ksym;
extern void bpf_iter_task_vma_destroy(struct bpf_iter_task_vma *it) __ksym;

/* Anonymous shared memory is a shmem file named "dev/zero"; no real file can have a '/' in
 * its name, so this cannot be forged. Its content is the process's own (like a JIT's). */
static __always_inline bool td_is_anon_shared(struct file *file)
{
	char name[9] = {};
	const unsigned char *p = BPF_CORE_READ(file, f_path.dentry, d_name.name);

	bpf_probe_read_kernel_str(name, sizeof(name), p);
	return name[0] == 'd' && name[1] == 'e' && name[2] == 'v' && name[3] == '/' &&
	       name[4] == 'z' && name[5] == 'e' && name[6] == 'r' && name[7] == 'o' && !name[8];
}

/* Check every executable file mapping of `task` that overlaps [start, end). The lock is only
 * tried (we may run where mmap_lock cannot be waited for); if it stays busy, fail closed. */
static __always_inline void td_scan_vmas(struct task_struct *task, __u8 hook, __u64 start,
					 __u64 end)
{
	struct bpf_iter_task_vma it;
	struct vm_area_struct *vma;
	struct file *file;
	int err = -1, i;

	for (i = 0; i < 4; i++) {
		err = bpf_iter_task_vma_new(&it, task, start);
		if (!err)
			break;
		bpf_iter_task_vma_destroy(&it);
	}
	if (err) {
		td_deny(task, hook, TD_REASON_SCAN_BUSY, NULL, NULL);
		return;
	}
	while ((vma = bpf_iter_task_vma_next(&it))) {
		if (vma->vm_start >= end)
			break;
		if (!(vma->vm_flags & TD_VM_EXEC))
			continue;
		file = vma->vm_file;
		if (!file || td_is_anon_shared(file))
			continue;
		if (td_check_file(task, hook, file) != TD_ALLOW)
			break;
	}
	bpf_iter_task_vma_destroy(&it);
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
	t = td_task_mark(child, true);
	if (t)
		t->confined = 1;
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(handle_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!td_task_confined(task))
		return 0;
	if (td_check_file(task, TD_HOOK_EXEC, bprm->file) != TD_ALLOW &&
	    td_cfg.mode == TD_MODE_ENFORCE)
		return 0;
	/* The binary passed; the kernel also mapped its ELF interpreter. */
	td_scan_vmas(task, TD_HOOK_EXEC, 0, ~0ULL);
	return 0;
}

/* Remember where mmap() is placing its new mapping (only for confined tasks in mmap). */
SEC("tp_btf/vm_unmapped_area")
int BPF_PROG(handle_unmapped_area, unsigned long addr, struct vm_unmapped_area_info *info)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_mmap_area *area;

	area = bpf_task_storage_get(&mmap_area, task, 0, 0);
	if (!area) {
		if (!td_task_confined(task))
			return 0;
		area = bpf_task_storage_get(&mmap_area, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (!area)
			return 0;
	}
	area->start = addr;
	area->len = info->length;
	return 0;
}

SEC("tp_btf/mmap_lock_released")
int BPF_PROG(handle_mmap_unlock, struct mm_struct *mm, bool write)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs;
	struct td_mmap_area *area;
	__u64 nr, start = 0, end = ~0ULL, prot;
	bool exec_implied;
	__u8 hook;

	/* Cheap filters first: this runs for every mmap_lock write release on the machine. */
	if (!write || task->mm != mm)
		return 0;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = BPF_CORE_READ(regs, orig_ax) & ~TD_X32_SYSCALL_BIT;
	if (task->thread_info.status & TD_TS_COMPAT) {
		if (nr != TD_NR32_OLD_MMAP && nr != TD_NR32_MMAP2 && nr != TD_NR32_MPROTECT &&
		    nr != TD_NR32_PKEY_MPROTECT && nr != TD_NR32_REMAP_FILE_PAGES)
			return 0;
		if (!td_task_confined(task))
			return 0;
		td_scan_vmas(task, nr == TD_NR32_MPROTECT || nr == TD_NR32_PKEY_MPROTECT ?
				   TD_HOOK_MPROTECT : TD_HOOK_MMAP, 0, ~0ULL);
		return 0;
	}
	if (nr != TD_NR_MMAP && nr != TD_NR_MPROTECT && nr != TD_NR_PKEY_MPROTECT &&
	    nr != TD_NR_REMAP_FILE_PAGES)
		return 0;
	if (!td_task_confined(task))
		return 0;

	prot = BPF_CORE_READ(regs, dx);
	exec_implied = (task->personality & TD_READ_IMPLIES_EXEC) && (prot & TD_PROT_READ);
	if (nr == TD_NR_MMAP) {
		hook = TD_HOOK_MMAP;
		area = bpf_task_storage_get(&mmap_area, task, 0, 0);
		if (BPF_CORE_READ(regs, r10) & (TD_MAP_FIXED | TD_MAP_FIXED_NOREPLACE)) {
			start = BPF_CORE_READ(regs, di);
			end = start + BPF_CORE_READ(regs, si);
		} else if (area && area->len) {
			start = area->start;
			end = start + area->len;
		} /* else: no address search seen; scan everything */
		if (area)
			area->len = 0;
		if (!(prot & TD_PROT_EXEC) && !exec_implied)
			return 0;
	} else if (nr == TD_NR_REMAP_FILE_PAGES) {
		hook = TD_HOOK_MMAP;
		start = BPF_CORE_READ(regs, di);
		end = start + BPF_CORE_READ(regs, si);
	} else {
		hook = TD_HOOK_MPROTECT;
		if (!(prot & TD_PROT_EXEC) && !exec_implied)
			return 0;
		start = BPF_CORE_READ(regs, di);
		end = start + BPF_CORE_READ(regs, si);
	}
	td_scan_vmas(task, hook, start & ~0xfffULL, end);
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

	if (td_cfg.scope_cgroup_id == 0)
		return 0;
	if (td_cgroup_in_scope(dst)) {
		t = td_task_mark(moved, true);
		if (t)
			t->confined = 1;
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
