/* SPDX-License-Identifier: GPL-2.0-only */
/* The service's per-uid and per-cgroup modes, decided in the kernel on the deny path.
 *
 * `mode_cgroups` (cgroup v2 id -> enum td_mode) and `mode_uids` (uid -> enum td_mode) are
 * filled by userspace from the policy's [service.cgroups] and [service.uids]
 * (trustdb.service.modes); empty maps leave td_config.mode in force. A `run` engine
 * (scope_cgroup_id != 0) never looks at them: its tree has its own mode and nothing a
 * service rule says can weaken it. Included by common.bpf.h. */
#ifndef __TRUSTDB_MODES_BPF_H
#define __TRUSTDB_MODES_BPF_H

#define TD_MODE_DEPTH 32 /* cgroup levels searched; userspace refuses deeper rules */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} mode_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} mode_uids SEC(".maps");

/* The last answer of td_mode_of(): what td_event_init() copies into an event. A global, not
 * a per-CPU map, so that reading it costs no map lookup and no stack (the tracepoint object is
 * at the 512-byte combined stack limit on 6.1). Two CPUs deciding at once may mix the *names*
 * of their rules in the log; the mode each decision acts on is td_mode_of()'s return value. */
struct td_mode_choice {
	__u64 cgroup;
	__u8 mode;
	__u8 rule;
};

struct td_mode_choice td_mode_last = {};

/* The mode of a task in cgroup `cgroup_ptr` (a struct cgroup *, as a number so this is a
 * global function, verified once) with real uid `uid` and effective uid `euid`: the deepest
 * listed ancestor (the longest path prefix) wins; else the uid's rule, where an audit rule
 * counts only if the effective uid is in audit too (a setuid-root program run by an audit
 * user is judged as root); else td_config.mode. The answer is also left in td_mode_last. */
__noinline int td_mode_of(__u64 cgroup_ptr, __u32 uid, __u32 euid)
{
	struct cgroup *cg = (struct cgroup *)cgroup_ptr, *anc;
	struct td_mode_choice *c = &td_mode_last;
	__u8 *rule;
	int level;

	c->mode = td_cfg.mode;
	c->rule = TD_MODE_RULE_DEFAULT;
	c->cgroup = 0;
	if (td_cfg.scope_cgroup_id != 0)
		return c->mode;
	level = cg ? BPF_CORE_READ(cg, level) : -1;
	for (int i = 0; i < TD_MODE_DEPTH; i++) {
		__u64 id;

		if (i > level)
			break;
		anc = NULL;
		bpf_core_read(&anc, sizeof(anc), &cg->ancestors[i]);
		if (!anc)
			break;
		id = BPF_CORE_READ(anc, kn, id);
		rule = bpf_map_lookup_elem(&mode_cgroups, &id);
		if (rule) { /* keep going: a deeper listed cgroup beats this one */
			c->mode = *rule;
			c->rule = TD_MODE_RULE_CGROUP;
			c->cgroup = id;
		}
	}
	if (c->rule == TD_MODE_RULE_CGROUP)
		return c->mode;
	rule = bpf_map_lookup_elem(&mode_uids, &uid);
	if (!rule)
		return c->mode;
	c->rule = TD_MODE_RULE_UID;
	c->mode = *rule;
	if (c->mode == TD_MODE_AUDIT && euid != uid) {
		__u8 *eff = bpf_map_lookup_elem(&mode_uids, &euid);

		if ((eff ? *eff : td_cfg.mode) != TD_MODE_AUDIT)
			c->mode = TD_MODE_ENFORCE;
	}
	return c->mode;
}

/* The mode in force for `task` (the current task: the one a denial acts on). */
static __always_inline __u8 td_task_mode(struct task_struct *task)
{
	__u64 cg = 0;

	if (td_cfg.scope_cgroup_id != 0)
		return td_cfg.mode; /* a `run` tree: its own mode, whatever the service says */
	cg = (__u64)BPF_CORE_READ(task, cgroups, dfl_cgrp);
	return td_mode_of(cg, BPF_CORE_READ(task, cred, uid.val),
			  BPF_CORE_READ(task, cred, euid.val));
}

#endif /* __TRUSTDB_MODES_BPF_H */
