/* SPDX-License-Identifier: GPL-2.0-only */
/* Reading a task's VMA tree (a maple tree, 6.1+) without its lock, and what a VMA's code is.
 *
 * Used where the tree cannot change under us or where we hold its lock's write side already:
 * at sched_process_exec (the new image is private to the single-threaded task) and at
 * mmap_lock_released (fired before mmap_write_unlock() drops the lock). bpf_find_vma() cannot
 * be used there (it trylocks, and at mmap_lock_released it cannot see the VMA being made).
 * Include after common.bpf.h. */
#ifndef __TRUSTDB_VMA_BPF_H
#define __TRUSTDB_VMA_BPF_H

#define TD_VM_WRITE 0x2UL
#define TD_VM_SHARED 0x8UL
#define TD_MAPLE_NODE_MASK 255UL
#define TD_MAPLE_TYPE_SHIFT 3
#define TD_MAPLE_TYPE_MASK 0x0f
#define TD_MAPLE_MAX_DEPTH 10
#define TD_S_IFMT 00170000
#define TD_S_IFCHR 0020000

/* The leaf of the tree that covers one address, for a walk over every VMA in order. */
struct td_leaf {
	__u64 node; /* struct maple_node *, 0 when the walk cannot go on */
	__u64 max; /* the highest address the leaf covers */
	__u32 off; /* the slot that covers the address */
	__u32 end; /* the leaf's last used slot */
};

/* Find the leaf covering `index` (as mtree_lookup_walk does, keeping each level's range), and
 * its last used slot (as ma_data_end does). Returns 0 when the tree has no node to walk.
 * A global function, so the verifier checks it once rather than at every call site. */
__noinline int td_maple_leaf(__u64 entry, __u64 index, struct td_leaf *out)
{
	unsigned long pivots[15];
	struct maple_node *node;
	__u64 max = ~0ULL, child_max;
	void *next = NULL;
	int depth, i, n, off;
	__u32 type;
	__u8 meta_end = 0;

	if (!out)
		return 0;
	out->node = 0;
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
		child_max = max;
		for (i = 0; i < 15; i++) {
			if (i >= n)
				break;
			if (pivots[i] >= index) {
				off = i;
				child_max = pivots[i];
				break;
			}
		}
		if (type == maple_leaf_64) {
			out->node = (__u64)node;
			out->max = max;
			out->off = off;
			if (!pivots[14]) {
				bpf_core_read(&meta_end, 1, &node->mr64.meta.end);
				out->end = meta_end > 15 ? 15 : meta_end;
			} else {
				out->end = pivots[14] == max ? 14 : 15;
			}
			return 1;
		}
		if (type == maple_arange_64)
			bpf_core_read(&next, sizeof(next), &node->ma64.slot[off & 15]);
		else
			bpf_core_read(&next, sizeof(next), &node->mr64.slot[off & 15]);
		entry = (unsigned long)next;
		max = child_max;
	}
	return 0;
}

/* The VMA covering `index` in `mm`, or NULL (a gap). */
static __always_inline struct vm_area_struct *td_vma_lookup(struct mm_struct *mm, __u64 index)
{
	struct vm_area_struct *vma = NULL;
	struct maple_node *node;
	struct td_leaf leaf;
	__u32 slot;

	if (!td_maple_leaf((__u64)BPF_CORE_READ(mm, mm_mt.ma_root), index, &leaf) ||
	    leaf.off > leaf.end)
		return NULL;
	node = (struct maple_node *)leaf.node;
	slot = leaf.off & 15; /* outside bpf_core_read: not a CO-RE access */
	bpf_core_read(&vma, sizeof(vma), &node->mr64.slot[slot]);
	return vma;
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

static __always_inline bool td_is_char_device(struct file *file)
{
	return (BPF_CORE_READ(file, f_inode, i_mode) & TD_S_IFMT) == TD_S_IFCHR;
}

/* What an executable VMA runs. */
enum td_code {
	TD_CODE_NONE = 0, /* not executable, or the kernel's own (vdso, uprobes area) */
	TD_CODE_FILE = 1, /* a file's content, as mapped: judge the file */
	TD_CODE_SELF = 2, /* bytes the process wrote itself: anonymous memory, an executable stack,
			   * anonymous shared memory or a device (/dev/zero), a private file mapping
			   * that is writable too (W+X), or, with `written`, one that has
			   * copy-on-write pages already (written, then made executable) */
};

static __always_inline int td_vma_code(struct vm_area_struct *vma, struct file **filep,
				       bool written)
{
	unsigned long flags = BPF_CORE_READ(vma, vm_flags);
	struct file *file;

	*filep = NULL;
	if (!(flags & TD_VM_EXEC))
		return TD_CODE_NONE;
	file = BPF_CORE_READ(vma, vm_file);
	if (!file)
		/* Special mappings (vdso, uprobes) have vm_ops; plain anonymous memory has none. */
		return BPF_CORE_READ(vma, vm_ops) ? TD_CODE_NONE : TD_CODE_SELF;
	if (td_is_anon_shared(file) || td_is_char_device(file))
		return TD_CODE_SELF;
	if ((flags & (TD_VM_WRITE | TD_VM_SHARED)) == TD_VM_WRITE)
		return TD_CODE_SELF;
	if (written && BPF_CORE_READ(vma, anon_vma))
		return TD_CODE_SELF;
	*filep = file;
	return TD_CODE_FILE;
}

/* ---- every executable mapping of a new image ----------------------------------------------- */

#define TD_IMAGE_LEAVES 64 /* x up to 16 slots: more VMAs than a fresh image ever has */

struct td_image_walk {
	__u64 root; /* mm->mm_mt.ma_root */
	__u64 index; /* the next address to look at */
	__u64 exe; /* bprm->file, judged already */
	struct td_leaf leaf; /* leaf.node == 0: find the leaf covering `index` */
	__u32 files; /* judge file mappings too (tracepoint); else only self-written code */
	__u32 done; /* walked up to the top of the address space */
	int verdict;
};

/* One slot of the tree: a VMA (judged) or a gap. Returns 1 to stop. */
static long td_image_step(__u64 i, void *arg)
{
	struct td_image_walk *w = arg;
	struct task_struct *task = bpf_get_current_task_btf();
	struct vm_area_struct *vma = NULL;
	struct maple_node *node;
	struct file *file;
	__u32 slot;
	int code;

	if (!w->leaf.node) {
		if (!td_maple_leaf(w->root, w->index, &w->leaf))
			return 1; /* not done: fails closed */
	}
	if (w->leaf.off > w->leaf.end || w->leaf.off > 15) {
		if (w->leaf.max == ~0ULL) {
			w->done = 1;
			return 1;
		}
		w->index = w->leaf.max + 1;
		w->leaf.node = 0;
		return 0;
	}
	node = (struct maple_node *)w->leaf.node;
	slot = w->leaf.off & 15; /* outside bpf_core_read: not a CO-RE access */
	bpf_core_read(&vma, sizeof(vma), &node->mr64.slot[slot]);
	w->leaf.off++;
	if (!vma)
		return 0; /* a gap */
	code = td_vma_code(vma, &file, false);
	if (code == TD_CODE_SELF)
		w->verdict = td_check_self(task, TD_HOOK_EXEC);
	else if (code == TD_CODE_FILE && w->files && (__u64)file != w->exe)
		w->verdict = td_check_file(task, TD_HOOK_EXEC, file);
	return w->verdict == TD_DENY;
}

/* Judge every executable mapping of the image the current task has just exec'd: the ELF
 * interpreter wherever it lies (AT_BASE is 0 for an ET_EXEC one, and its segments may leave
 * holes), and any anonymous executable VMA (an executable stack, -z execstack). Walks the whole
 * tree in address order; a tree too big to walk fails closed. */
static __always_inline void td_check_image(struct task_struct *task, struct file *exe, bool files)
{
	struct td_image_walk w = {};

	w.root = (__u64)BPF_CORE_READ(task, mm, mm_mt.ma_root);
	w.exe = (__u64)exe;
	w.files = files;
	w.verdict = TD_ALLOW;
	bpf_loop(TD_IMAGE_LEAVES * 17, td_image_step, &w, 0);
	if (!w.done && w.verdict == TD_ALLOW)
		td_deny(task, TD_HOOK_EXEC, TD_REASON_UNVERIFIABLE, NULL, NULL);
}

#endif /* __TRUSTDB_VMA_BPF_H */
