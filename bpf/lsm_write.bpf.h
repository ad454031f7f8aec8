/* SPDX-License-Identifier: GPL-2.0-only */
/* lsm backend: writes to code, refused to a task in a `run` tree (issue 8, route 3).
 *
 * A process that maps a file runs whatever the page cache holds, so content trusted once must
 * not change while it may run: a confined task may not open for writing, truncate, or map
 * shared-writable a file whose current key is trusted, nor a file a confined task executed or
 * mapped executable (exec_inodes), and may not open any /proc/PID/mem for writing (forced
 * writes over read-only text). System-wide (service mode) these stay open: installers and
 * debuggers write there; the writers check at exec and mmap time still applies.
 * Included by lsm.bpf.c after its helpers. */
#ifndef __TRUSTDB_LSM_WRITE_BPF_H
#define __TRUSTDB_LSM_WRITE_BPF_H

static __always_inline int lsm_write_denied(__u32 reason, const struct td_inode_key *key,
					    struct file *file)
{
	struct task_struct *task = bpf_get_current_task_btf();

	if (!lsm_guarded(task))
		return 0;
	return lsm_deny(task, TD_HOOK_WRITE, reason, key, file, false);
}

/* A write to `inode` (through `file`, if there is one) by the current task. */
static __always_inline int lsm_check_write(struct file *file, struct inode *inode)
{
	struct td_inode_key key, ident;

	if (!inode || !lsm_guarded(bpf_get_current_task_btf()))
		return 0;
	td_inode_key(inode, &key);
	lsm_inode_ident(inode, &ident);
	if (!td_is_trusted(&key) && !bpf_map_lookup_elem(&exec_inodes, &ident))
		return 0;
	return lsm_write_denied(TD_REASON_WRITABLE, &key, file);
}

#endif /* __TRUSTDB_LSM_WRITE_BPF_H */
