// SPDX-License-Identifier: GPL-2.0-only
/* trustdb's `tracepoint` backend, for kernels without BPF LSM (and without fentry).
 *
 * Tracepoints cannot return an error, so a denial is SIGKILL, sent from a point where the task
 * has not yet run a single instruction of the denied code:
 *   exec      tp_btf/sched_process_exec: bprm->file, after the point of no return, before the
 *             first user instruction; plus every executable file mapping of the new image
 *             (the ELF interpreter named by PT_INTERP).
 *   mmap,     tp_btf/mmap_lock_released: the mapping the kernel actually made, read from the
 *   mprotect  task's VMA tree as mmap()/mprotect() releases mmap_lock, still inside the
 *             syscall (no race with a thread that swaps the fd). Syscall tracepoints would tax
 *             every syscall of every task; these two fire only on mmap_lock use and
 *             vm_unmapped_area (address search for a new mapping).
 *   tamper    tp_btf/cgroup_attach_task, tp_btf/signal_generate: a confined task moving a task
 *             out of the scope, or signalling the supervisor, is killed.
 * Confinement is a mark in task storage, copied to children at tp_btf/sched_process_fork.
 */
#include "common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define barrier() asm volatile("" ::: "memory")
#define TD_PROT_READ 0x1
#define TD_PROT_EXEC 0x4
#define TD_MAP_FIXED 0x10
#define TD_MAP_ANONYMOUS 0x20
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

/* ---- finding the mapping the kernel just made ---------------------------------------------
 * mmap_lock_released fires before mmap_write_unlock() drops the lock and the per-VMA write
 * locks, so neither bpf_find_vma() (trylock fails) nor the task_vma iterator (skips VMAs being
 * written) can see the new mapping. We hold the lock's write side ourselves, so we read the
 * VMA tree (a maple tree, 6.1+) directly, the way mtree_load() does. */
#define TD_MAPLE_NODE_MASK 255UL
#define TD_MAPLE_TYPE_SHIFT 3
#define TD_MAPLE_TYPE_MASK 0x0f
#define TD_MAPLE_MAX_DEPTH 10

/* A global function, so the verifier checks it once rather than at every call site. Takes the
 * tree's root entry (mm->mm_mt.ma_root) and returns the VMA covering `index`, or 0. */
__noinline unsigned long td_maple_lookup(unsigned long entry, __u64 index)
{
	unsigned long pivots[15];
	struct maple_node *node;
	void *next = NULL;
	int depth, i, n, off;
	__u32 type;

	/* A root that is not a node (bit 1 clear) holds at most one entry at index 0. */
	if ((entry & 3) != 2 || entry <= 4096)
		return 0;
	for (depth = 0; depth < TD_MAPLE_MAX_DEPTH; depth++) {
		if (entry <= 4096)
			return 0;
		node = (struct maple_node *)(entry & ~TD_MAPLE_NODE_MASK);
		type = (entry >> TD_MAPLE_TYPE_SHIFT) & TD_MAPLE_TYPE_MASK;
		if (type == maple_arange_64) {
			n = 9;
			if (bpf_core_read(pivots, 9 * sizeof(long), &node->ma64.pivot))
				return 0;
		} else if (type == maple_leaf_64 || type == maple_range_64) {
			n = 15;
			if (bpf_core_read(pivots, sizeof(pivots), &node->mr64.pivot))
				return 0;
		} else {
			return 0;
		}
		off = n;
		for (i = 0; i < 15; i++) {
			if (i >= n)
				break;
			if (pivots[i] >= index) {
				off = i;
				break;
			}
		}
		if (type == maple_arange_64)
			bpf_core_read(&next, sizeof(next), &node->ma64.slot[off & 15]);
		else
			bpf_core_read(&next, sizeof(next), &node->mr64.slot[off & 15]);
		if (type == maple_leaf_64)
			return (unsigned long)next;
		entry = (unsigned long)next;
	}
	return 0;
}

static __always_inline struct vm_area_struct *td_vma_lookup(struct mm_struct *mm, __u64 index)
{
	return (void *)td_maple_lookup((unsigned long)BPF_CORE_READ(mm, mm_mt.ma_root), index);
}

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

#define TD_MAX_RUN 64

/* Check the run of adjacent mappings of the current task that starts at `addr` and overlaps
 * [addr, end). Returns -1 if no mapping is at `addr`, else the verdict (TD_ALLOW when all
 * passed). A global function: verified once, however many callers. */
__noinline int td_check_run(int hook, __u64 addr, __u64 end)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	struct vm_area_struct *vma;
	struct file *file;
	int i, verdict;

	for (i = 0; i < TD_MAX_RUN; i++) {
		vma = td_vma_lookup(mm, addr);
		if (!vma || BPF_CORE_READ(vma, vm_start) >= end)
			return i == 0 ? -1 : TD_ALLOW;
		if (BPF_CORE_READ(vma, vm_flags) & TD_VM_EXEC) {
			file = BPF_CORE_READ(vma, vm_file);
			if (file && !td_is_anon_shared(file)) {
				verdict = td_check_file(task, hook, file);
				if (verdict != TD_ALLOW)
					return verdict;
			}
		}
		addr = BPF_CORE_READ(vma, vm_end);
		if (addr >= end)
			return TD_ALLOW;
	}
	/* A range with more mappings than we walk (an mprotect over a huge area): fail closed. */
	return td_deny(task, hook, TD_REASON_UNVERIFIABLE, NULL, NULL);
}

/* The file behind `fd` in the current task, judged as an mmap when the mapping made from it
 * could not be located. */
static __always_inline void td_check_fd(struct task_struct *task, __u64 fd)
{
	struct file **fds;
	struct file *file = NULL;
	unsigned int max;

	fds = BPF_CORE_READ(task, files, fdt, fd);
	max = BPF_CORE_READ(task, files, fdt, max_fds);
	if (fd < max)
		bpf_core_read(&file, sizeof(file), &fds[fd]);
	if (file)
		td_check_file(task, TD_HOOK_MMAP, file);
	else
		td_deny(task, TD_HOOK_MMAP, TD_REASON_UNVERIFIABLE, NULL, NULL);
}

#define TD_AT_BASE 7

/* Value of `type` in the auxiliary vector the kernel built for this exec (0 if absent). */
static __always_inline __u64 td_auxv(struct mm_struct *mm, __u64 type)
{
	unsigned long auxv[2];
	int i;

	for (i = 0; i < 28; i++) {
		if (bpf_core_read(auxv, sizeof(auxv), &mm->saved_auxv[2 * i]))
			return 0;
		if (auxv[0] == type)
			return auxv[1];
		if (auxv[0] == 0)
			return 0;
	}
	return 0;
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
	__u64 interp;

	if (!td_task_confined(task))
		return 0;
	if (td_check_file(task, TD_HOOK_EXEC, bprm->file) != TD_ALLOW &&
	    td_cfg.mode == TD_MODE_ENFORCE)
		return 0;
	/* The binary passed; the kernel also mapped its ELF interpreter (PT_INTERP), whose load
	 * address is AT_BASE in the auxiliary vector. */
	interp = td_auxv(task->mm, TD_AT_BASE);
	if (interp)
		td_check_run(TD_HOOK_EXEC, interp, interp + (16ULL << 20));
	return 0;
}

/* Remember where mmap() is placing its new mapping (only for confined tasks in mmap). */
SEC("tp_btf/vm_unmapped_area")
int BPF_PROG(handle_unmapped_area, unsigned long addr, struct vm_unmapped_area_info *info)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct td_mmap_area *area;

	if (!td_task_marked(task))
		return 0;
	area = bpf_task_storage_get(&mmap_area, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!area)
		return 0;
	area->start = addr;
	area->len = info->length;
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
	bool write;
	struct td_mmap_area *area;
	struct pt_regs *regs;
	__u64 nr, prot, flags, start, end, off, cand[3] = {};
	bool compat, exec_implied;
	int i, verdict = -1;

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
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = BPF_CORE_READ(regs, orig_ax) & ~TD_X32_SYSCALL_BIT;
	compat = task->thread_info.status & TD_TS_COMPAT;
	if (compat) {
		if (nr != TD_NR32_OLD_MMAP && nr != TD_NR32_MMAP2 && nr != TD_NR32_MPROTECT &&
		    nr != TD_NR32_PKEY_MPROTECT && nr != TD_NR32_REMAP_FILE_PAGES)
			return 0;
	} else if (nr != TD_NR_MMAP && nr != TD_NR_MPROTECT && nr != TD_NR_PKEY_MPROTECT &&
		   nr != TD_NR_REMAP_FILE_PAGES) {
		return 0;
	}
	if (compat) {
		/* ia32 syscalls from a 64-bit process: an escape hatch, not a use case. */
		td_deny(task, TD_HOOK_MMAP, TD_REASON_UNVERIFIABLE, NULL, NULL);
		return 0;
	}

	prot = BPF_CORE_READ(regs, dx);
	flags = BPF_CORE_READ(regs, r10);
	start = BPF_CORE_READ(regs, di);
	end = start + BPF_CORE_READ(regs, si);
	exec_implied = (task->personality & TD_READ_IMPLIES_EXEC) && (prot & TD_PROT_READ);

	if (nr == TD_NR_MMAP) {
		area = bpf_task_storage_get(&mmap_area, task, 0, 0);
		if (flags & (TD_MAP_FIXED | TD_MAP_FIXED_NOREPLACE)) {
			cand[0] = start;
		} else {
			/* Where the kernel put it: the address search's result, moved up to
			 * the file offset's 2 MiB alignment by THP placement, or the hint. */
			off = BPF_CORE_READ(regs, r9);
			if (area && area->len) {
				cand[0] = area->start;
				cand[1] = area->start + ((off - area->start) & 0x1fffffULL);
				end = area->start + area->len;
			}
			cand[2] = start & ~0xfffULL;
			end = end > start ? end : ~0ULL;
		}
		if (area)
			area->len = 0;
		if (!(prot & TD_PROT_EXEC) && !exec_implied)
			return 0;
		if (flags & TD_MAP_ANONYMOUS)
			return 0; /* no file; anonymous shared memory is skipped as well */
		for (i = 0; i < 3; i++) {
			if (!cand[i])
				continue;
			verdict = td_check_run(TD_HOOK_MMAP, cand[i], cand[i] > end ? ~0ULL : end);
			if (verdict >= 0)
				break;
		}
		/* No mapping where it should be: most likely the mmap failed (a noexec mount, a
		 * JIT probing /dev/shm). Judge the file behind the fd instead; only a swap of that
		 * fd by another thread could fool this, so an untrusted or missing file is denied. */
		if (verdict < 0)
			td_check_fd(task, BPF_CORE_READ(regs, r8));
		return 0;
	}
	if (nr == TD_NR_REMAP_FILE_PAGES) {
		td_check_run(TD_HOOK_MMAP, start & ~0xfffULL, end);
		return 0;
	}
	/* mprotect / pkey_mprotect: the kernel changed [start, end) from `start` upwards. */
	if (!(prot & TD_PROT_EXEC) && !exec_implied)
		return 0;
	td_check_run(TD_HOOK_MPROTECT, start & ~0xfffULL, end);
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
