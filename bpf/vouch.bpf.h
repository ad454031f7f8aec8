/* SPDX-License-Identifier: GPL-2.0-only */
/* The first-seen handler's word for an inode whose key moved (trustdb.first_seen_marks.may_vouch
 * says where it may be given). Included by common.bpf.h after its maps (first_seen_group). */
#ifndef __TRUSTDB_VOUCH_BPF_H
#define __TRUSTDB_VOUCH_BPF_H

/* The bit the handler adds to the ignore mask of an inode whose content it verified as trusted
 * (FS_CLOSE_WRITE: an event its group never asks for, so ignoring it changes nothing else). */
#define TD_VOUCHED_BIT 0x00000008U
#define TD_MAX_MARKS 8

/* Has the first-seen handler verified this inode's content as trusted, with no change to the
 * content since? Its ignore mark says so: the kernel clears an ignore mask on every
 * modification of the content (FS_MODIFY: write, truncate, fallocate, copy_file_range), and
 * the handler flushes all of them when the database changes. A key that misses only because
 * ctime moved without the content changing (chmod, chown, rename, link, utime, xattr), before
 * the handler's notification of that change has dropped the mark, is then still trusted:
 * otherwise a trusted file exec'd right after a chmod was killed now and then. Stores through
 * a shared-writable mapping raise no FS_MODIFY: the handler adds the bit only where no writer
 * in scope can change the bytes (trustdb.first_seen_marks.may_vouch). */
/* fsnotify_group.priority is an unsigned int up to 6.x and an enum fsnotify_group_prio later:
 * CO-RE refuses an int/enum kind mismatch, so read it through the flavour the kernel has (6.1
 * failed to load the whole object otherwise). */
struct fsnotify_group___prio_enum {
	enum fsnotify_group_prio priority;
} __attribute__((preserve_access_index));

struct fsnotify_group___prio_int {
	unsigned int priority;
} __attribute__((preserve_access_index));

static __always_inline __u32 td_group_priority(struct fsnotify_group *group)
{
	if (bpf_core_field_exists(struct fsnotify_group___prio_enum, priority))
		return BPF_CORE_READ((struct fsnotify_group___prio_enum *)group, priority);
	if (bpf_core_field_exists(struct fsnotify_group___prio_int, priority))
		return BPF_CORE_READ((struct fsnotify_group___prio_int *)group, priority);
	return 0;
}

static __always_inline bool td_vouched_by_handler(struct inode *inode)
{
	__u32 zero = 0;
	struct td_first_seen_group *g = bpf_map_lookup_elem(&first_seen_group, &zero);
	struct hlist_node *node;
	struct fsnotify_mark *mark;
	int i;

	if (!g || !g->group)
		return false;
	node = BPF_CORE_READ(inode, i_fsnotify_marks, list.first);
	for (i = 0; i < TD_MAX_MARKS && node; i++) {
		mark = (void *)node - bpf_core_field_offset(struct fsnotify_mark, obj_list);
		struct fsnotify_group *group = BPF_CORE_READ(mark, group);

		/* The address alone is not enough: once the handler's group is freed, another
		 * group may be allocated there before userspace forgets it. Only a permission-class
		 * group (priority above notification) counts, and only CAP_SYS_ADMIN creates one
		 * (an unprivileged fanotify_init gets FAN_CLASS_NOTIF; `run` denies fanotify). */
		if ((__u64)group == g->group && td_group_priority(group) > 0 &&
		    !BPF_CORE_READ(group, shutdown) &&
		    (BPF_CORE_READ(mark, ignore_mask) & TD_VOUCHED_BIT))
			return true;
		node = BPF_CORE_READ(node, next);
	}
	return false;
}

/* Is the file trusted: its key in the map, or vouched for by the handler (see above)? */
static __always_inline bool td_file_trusted(struct file *file, const struct td_inode_key *key)
{
	return td_is_trusted(key) || td_vouched_by_handler(BPF_CORE_READ(file, f_inode));
}

/* Fills in the first-seen handler's group: the file behind fd `fd` of process `tgid`. Run once
 * by userspace (bpf_iter over every task's files) after the handler started. */
SEC("iter/task_file")
int find_first_seen_group(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	__u32 zero = 0;
	struct td_first_seen_group *g = bpf_map_lookup_elem(&first_seen_group, &zero);

	if (!task || !file || !g || task->tgid != g->tgid || ctx->fd != g->fd)
		return 0;
	g->group = (__u64)BPF_CORE_READ(file, private_data);
	return 0;
}

#endif /* __TRUSTDB_VOUCH_BPF_H */
