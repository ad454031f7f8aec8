// SPDX-License-Identifier: GPL-2.0-only
/* One small program for the BPF LSM tier: each subcommand tries one thing a confined task may
 * or may not do, and prints `ok` or `errno=N` (exit 0 / 1). Built on the host by
 * tests/vm/test_lsm.py; -DVARIANT makes a binary with other content (an untrusted one). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/ptrace.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef VARIANT
#define VARIANT "trusted"
#endif

extern char **environ;

static int report(int ret)
{
	if (ret < 0) {
		printf("errno=%d\n", errno);
		return 1;
	}
	printf("ok\n");
	return 0;
}

static int open_or_die(const char *path, int flags)
{
	int fd = open(path, flags);

	if (fd < 0) {
		printf("errno=%d\n", errno);
		exit(1);
	}
	return fd;
}

/* Copy `src` into a memfd and fexecve it with `hello`. */
static int memfd_exec(const char *src)
{
	char buf[65536];
	ssize_t n;
	int in = open_or_die(src, O_RDONLY), mfd = memfd_create("tdprobe", MFD_CLOEXEC);
	char *argv[] = {"memfd", "hello", NULL};

	while ((n = read(in, buf, sizeof(buf))) > 0)
		if (write(mfd, buf, n) != n)
			return report(-1);
	fexecve(mfd, argv, environ);
	return report(-1);
}

static int exec_at(const char *src, int via_proc)
{
	char *argv[] = {"execveat", "hello", NULL};
	char path[64];
	int fd = open_or_die(src, O_RDONLY);

	if (via_proc) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		execve(path, argv, environ);
	} else {
		syscall(SYS_execveat, fd, "", argv, environ, AT_EMPTY_PATH);
	}
	return report(-1);
}

static int map_then_mprotect(const char *path)
{
	int fd = open_or_die(path, O_RDONLY);
	void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);

	if (p == MAP_FAILED)
		return report(-1);
	return report(mprotect(p, 4096, PROT_READ | PROT_EXEC));
}

static int map_exec(const char *path)
{
	int fd = open_or_die(path, O_RDONLY);

	return report(mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED ?
			      -1 : 0);
}

static int use_bpf(void)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = 4;
	attr.value_size = 4;
	attr.max_entries = 1;
	return report((int)syscall(SYS_bpf, BPF_MAP_CREATE, &attr, sizeof(attr)));
}

static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		return report(-1);
	return report(write(fd, text, strlen(text)) < 0 ? -1 : 0);
}

/* ---- code the process writes itself, and writes to code (issue 8, routes 1, 3, 4) ---- */

/* x86_64: mov eax, 42; ret */
static const unsigned char ret42[] = {0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3};

/* Run the bytes at `code`: prints `ran 42` if they ran. */
static int run_code(void *code)
{
	int (*fn)(void) = (int (*)(void))code;

	printf("ran %d\n", fn());
	return 0;
}

/* Anonymous memory, written, then made executable: by mmap(RWX), by mprotect(RX) after the
 * write, or shared anonymous memory mapped RWX. */
static int self_code(const char *how)
{
	int rwx = PROT_READ | PROT_WRITE | PROT_EXEC, shared = !strcmp(how, "shared");
	int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS;
	int first = !strcmp(how, "mprotect") ? PROT_READ | PROT_WRITE : rwx;
	unsigned char *p = mmap(NULL, 4096, first, flags, -1, 0);

	if (p == MAP_FAILED)
		return report(-1);
	memcpy(p, ret42, sizeof(ret42));
	if (first != rwx && mprotect(p, 4096, PROT_READ | PROT_EXEC))
		return report(-1);
	return run_code(p);
}

/* A private mapping of a (trusted) file, written, then executed: `wx` maps it RWX at once,
 * `written` maps it RW, writes, then mprotects it RX (copy-on-write pages are the task's own). */
static int file_self_code(const char *how, const char *path)
{
	int fd = open_or_die(path, O_RDONLY);
	int prot = !strcmp(how, "wx") ? PROT_READ | PROT_WRITE | PROT_EXEC : PROT_READ | PROT_WRITE;
	unsigned char *p = mmap(NULL, 4096, prot, MAP_PRIVATE, fd, 0);

	if (p == MAP_FAILED)
		return report(-1);
	memcpy(p, ret42, sizeof(ret42));
	if (!(prot & PROT_EXEC) && mprotect(p, 4096, PROT_READ | PROT_EXEC))
		return report(-1);
	return run_code(p);
}

/* SysV shared memory attached with SHM_EXEC. */
static int shm_exec(void)
{
	int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
	void *p;

	if (id < 0)
		return report(-1);
	p = shmat(id, NULL, SHM_EXEC);
	shmctl(id, IPC_RMID, NULL);
	if (p == (void *)-1)
		return report(-1);
	memcpy(p, ret42, sizeof(ret42));
	return run_code(p);
}

/* personality(READ_IMPLIES_EXEC): every readable private mapping and the heap run. */
static int read_implies_exec(void)
{
	unsigned char *p;

	if (personality(READ_IMPLIES_EXEC) < 0)
		return report(-1);
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return report(-1);
	memcpy(p, ret42, sizeof(ret42));
	return run_code(p);
}

/* A shared-writable mapping of a file: at once, or read-only first and then mprotect'ed. */
static int map_shared_writable(const char *path, int later)
{
	int fd = open_or_die(path, O_RDWR);
	int prot = later ? PROT_READ : PROT_READ | PROT_WRITE;
	void *p = mmap(NULL, 4096, prot, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED)
		return report(-1);
	if (later)
		return report(mprotect(p, 4096, PROT_READ | PROT_WRITE));
	return report(0);
}

/* Route 1: leave an address-search record with mremap(MREMAP_MAYMOVE), then mmap `path`
 * executable at a free hint address, which needs no search of its own. */
static int stale_search_record(const char *path)
{
	int fd = open_or_die(path, O_RDONLY);
	void *hint = mmap(NULL, 1 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *a = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *b, *p;

	if (hint == MAP_FAILED || a == MAP_FAILED || munmap(hint, 1 << 20))
		return report(-1);
	b = mremap(a, 4 * 4096, 64 * 4096, MREMAP_MAYMOVE);
	if (b == MAP_FAILED)
		return report(-1);
	p = mmap(hint, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0);
	if (p == MAP_FAILED)
		return report(-1);
	printf("mapped %s\n", p == hint ? "at the hint" : "elsewhere");
	return 0;
}

/* Open `path` for writing and wait (a writer that exists while others check the file). */
static int hold_writer(const char *path, const char *until)
{
	int fd = open_or_die(path, O_WRONLY);

	printf("holding\n");
	fflush(stdout);
	while (access(until, F_OK))
		usleep(20000);
	close(fd);
	return 0;
}

/* Benchmark loops (bench/exec_lsm.py): print the elapsed nanoseconds of N iterations. */
static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int spawn_loop(int n, const char *path)
{
	char *argv[] = {(char *)path, NULL};
	long long start = now_ns();
	int status;

	for (int i = 0; i < n; i++) {
		pid_t pid = fork();

		if (pid == 0) {
			execve(path, argv, environ);
			_exit(127);
		}
		if (pid < 0 || waitpid(pid, &status, 0) < 0 || status != 0)
			return report(-1);
	}
	printf("%lld\n", now_ns() - start);
	return 0;
}

static int getppid_loop(int n)
{
	long long start = now_ns();

	for (int i = 0; i < n; i++)
		syscall(SYS_getppid);
	printf("%lld\n", now_ns() - start);
	return 0;
}

static int load_module(void)
{
	static char image[4096]; /* not an ELF: a kernel that got this far answers ENOEXEC */

	return report((int)syscall(SYS_init_module, image, sizeof(image), ""));
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "hello";
	const char *arg = argc > 2 ? argv[2] : "";
	char pid[32];
	void *h;

	if (!strcmp(cmd, "hello")) {
		printf("hello from %s\n", VARIANT);
		return 0;
	}
	if (!strcmp(cmd, "dlopen")) {
		h = dlopen(arg, RTLD_NOW);
		printf("%s\n", h ? "ok" : dlerror());
		return h ? 0 : 1;
	}
	if (!strcmp(cmd, "memfd"))
		return memfd_exec(arg);
	if (!strcmp(cmd, "execveat"))
		return exec_at(arg, 0);
	if (!strcmp(cmd, "procfd"))
		return exec_at(arg, 1);
	if (!strcmp(cmd, "mprotect"))
		return map_then_mprotect(arg);
	if (!strcmp(cmd, "mmap"))
		return map_exec(arg);
	if (!strcmp(cmd, "bpf"))
		return use_bpf();
	if (!strcmp(cmd, "kill"))
		return report(kill(atoi(arg), argc > 3 ? atoi(argv[3]) : SIGUSR1));
	if (!strcmp(cmd, "ptrace"))
		return report((int)ptrace(PTRACE_ATTACH, atoi(arg), NULL, NULL));
	if (!strcmp(cmd, "openw"))
		return report(open(arg, O_WRONLY));
	if (!strcmp(cmd, "write"))
		return write_text(arg, argc > 3 ? argv[3] : "x");
	if (!strcmp(cmd, "truncate"))
		return report(truncate(arg, 0));
	if (!strcmp(cmd, "unlink"))
		return report(unlink(arg));
	if (!strcmp(cmd, "rename"))
		return report(rename(arg, argv[3]));
	if (!strcmp(cmd, "cgmove")) {
		snprintf(pid, sizeof(pid), "%d", getpid());
		return write_text(arg, pid);
	}
	if (!strcmp(cmd, "spawn"))
		return spawn_loop(atoi(arg), argc > 3 ? argv[3] : "/bin/true");
	if (!strcmp(cmd, "getppid"))
		return getppid_loop(atoi(arg));
	if (!strcmp(cmd, "module"))
		return load_module();
	if (!strcmp(cmd, "selfcode"))
		return self_code(arg);
	if (!strcmp(cmd, "fileselfcode"))
		return file_self_code(arg, argv[3]);
	if (!strcmp(cmd, "shmexec"))
		return shm_exec();
	if (!strcmp(cmd, "readimpliesexec"))
		return read_implies_exec();
	if (!strcmp(cmd, "mapshared"))
		return map_shared_writable(arg, 0);
	if (!strcmp(cmd, "mprotectshared"))
		return map_shared_writable(arg, 1);
	if (!strcmp(cmd, "stale"))
		return stale_search_record(arg);
	if (!strcmp(cmd, "holdwriter"))
		return hold_writer(arg, argv[3]);
	fprintf(stderr, "tdprobe: unknown command %s\n", cmd);
	return 2;
}
