// SPDX-License-Identifier: GPL-2.0-only
/* An ELF interpreter of our own (issue 8, route 2): a program whose PT_INTERP names it gets this
 * code run instead of ld.so's. No libc: it says so and exits. Built as ET_EXEC (a fixed address,
 * AT_BASE 0) and as a static PIE whose segments leave holes (2 MiB pages). */
static long td_syscall3(long nr, long a, long b, long c)
{
	long ret;

	asm volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

void _start(void)
{
	static const char msg[] = "interpreter ran\n";

	td_syscall3(1, 1, (long)msg, sizeof(msg) - 1); /* write(1, ...) */
	td_syscall3(60, 0, 0, 0); /* exit(0) */
	for (;;)
		;
}
