// SPDX-License-Identifier: GPL-2.0-only
/* An untrusted shared library for the BPF LSM tier: its constructor leaves a marker file, so a
 * test can tell whether any of its code ran (LD_PRELOAD, dlopen). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void td_evil(void)
{
	const char *marker = getenv("TD_MARKER");
	int fd = open(marker ? marker : "/tmp/td-evil-ran", O_CREAT | O_WRONLY, 0644);

	if (fd >= 0)
		close(fd);
	fprintf(stderr, "tdevil: constructor ran\n");
}
