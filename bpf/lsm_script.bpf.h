/* SPDX-License-Identifier: GPL-2.0-only */
/* lsm backend: interpreters load only trusted scripts (issue 10, section 3).
 *
 * A task whose program (mm->exe_file) is flagged TD_PROGRAM_INTERPRETER in program_flags
 * (python3, perl, bash, ruby, node, php, lua, tclsh, by the policy) may open a regular file
 * named like a script (.py .pyc .pl .pm .rb .sh .bash .js .mjs .cjs .lua .php .tcl) for
 * reading only if the file's key is trusted: `python3 evil.py`, `bash evil.sh`, `import evil`,
 * `source evil.sh` get EPERM.
 * Out of reach, by design of a file-open check: code that is not a file or not named like one.
 * `python3 -c CODE`, `bash -c CODE`, `node -e CODE`, code piped to an interpreter's stdin
 * (`cat x | python3`; a `<` redirection is opened by the shell, judged only if that shell is
 * flagged), eval/exec of strings, a script file without one of those extensions (`python3 x`,
 * `bash x.txt`), and files read by an unflagged program and handed over through a pipe or fd.
 * #! scripts executed directly are judged at exec (bprm_check_security) whatever their name.
 * Included by lsm.bpf.c after its helpers. */
#ifndef __TRUSTDB_LSM_SCRIPT_BPF_H
#define __TRUSTDB_LSM_SCRIPT_BPF_H

/* A name's last bytes (at most 7, and a NUL) as one little-endian number: no stack indexing. */
static __always_inline __u64 td_suffix(const char *s, int k)
{
	__u64 v = 0;

	for (int i = 0; i < k && i < 7; i++)
		v |= (__u64)(unsigned char)s[i] << (8 * i);
	return v;
}

static __always_inline bool td_ends_with(__u64 tail, int n, const char *s, int k)
{
	if (n < k || k > 7)
		return false;
	return ((tail >> (8 * ((n - k) & 7))) & ((1ULL << (8 * k)) - 1)) == td_suffix(s, k);
}

#define TD_ENDS(tail, n, s) td_ends_with(tail, n, s, sizeof(s) - 1)

static __always_inline bool lsm_named_like_a_script(struct dentry *d)
{
	const unsigned char *name = BPF_CORE_READ(d, d_name.name);
	__u32 len = BPF_CORE_READ(d, d_name.len);
	__u64 tail = 0;
	long n;

	n = bpf_probe_read_kernel_str(&tail, sizeof(tail), name + (len > 7 ? len - 7 : 0)) - 1;
	if (n <= 0 || n > 7)
		return false;
	return TD_ENDS(tail, n, ".py") || TD_ENDS(tail, n, ".pyc") || TD_ENDS(tail, n, ".pl") ||
	       TD_ENDS(tail, n, ".pm") || TD_ENDS(tail, n, ".rb") || TD_ENDS(tail, n, ".sh") ||
	       TD_ENDS(tail, n, ".bash") || TD_ENDS(tail, n, ".js") || TD_ENDS(tail, n, ".mjs") ||
	       TD_ENDS(tail, n, ".cjs") || TD_ENDS(tail, n, ".lua") || TD_ENDS(tail, n, ".php") ||
	       TD_ENDS(tail, n, ".tcl");
}

/* A file opened for reading by the current task. */
static __always_inline int lsm_check_script(struct file *file)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	struct td_inode_key key;

	if (!td_task_confined(task) || !(td_program_flags(task) & TD_PROGRAM_INTERPRETER))
		return 0;
	if ((BPF_CORE_READ(inode, i_mode) & S_IFMT) != S_IFREG ||
	    !lsm_named_like_a_script(BPF_CORE_READ(file, f_path.dentry)))
		return 0;
	td_inode_key(inode, &key);
	if (td_is_trusted(&key) && !td_file_has_writers(file))
		return 0;
	return lsm_deny(task, TD_HOOK_SCRIPT, TD_REASON_UNTRUSTED_SCRIPT, &key, file, false);
}

#endif /* __TRUSTDB_LSM_SCRIPT_BPF_H */
