/* An LD_PRELOAD library for the kill-at-every-write tests (tests/kit/rename_kill.py).
 *
 * It wraps libc's rename(), which is what Python's os.rename / os.replace and TensorFlow's
 * file system call. Every call, in the program and in the children that inherit LD_PRELOAD, is
 * numbered by one counter file (TFMET_RENAME_COUNTER, under flock), and, when TFMET_RENAME_LOG
 * is set, written there as a line `rename("old", "new")` before it runs. The call whose number
 * is TFMET_RENAME_KILL_AT sends SIGKILL to its own process before it renames anything.
 *
 * strace's signal injection did the same under full ptrace, which slows TensorFlow's import by
 * ~3x (tests/kit/cli.py: strace); this wrapper costs a lock and a small write per rename.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

/* The next number of the counter file at `path` (1 for the first call), or -1 if it cannot be
 * opened. While the lock is held, the call is also written to the log file `log`, if any, so
 * that the log's order is the numbering's. */
static long number_call(const char *path, const char *log, const char *from, const char *to) {
  int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) return -1;
  flock(fd, LOCK_EX);
  char text[32] = {0};
  ssize_t got = pread(fd, text, sizeof text - 1, 0);
  long number = (got > 0 ? strtol(text, NULL, 10) : 0) + 1;
  int length = snprintf(text, sizeof text, "%ld\n", number);
  if (pwrite(fd, text, (size_t)length, 0) != length) number = -1;
  if (log != NULL) {
    FILE *out = fopen(log, "ae");
    if (out != NULL) {
      fprintf(out, "rename(\"%s\", \"%s\")\n", from, to);
      fclose(out);
    }
  }
  flock(fd, LOCK_UN);
  close(fd);
  return number;
}

int rename(const char *from, const char *to) {
  static int (*real_rename)(const char *, const char *);
  const char *counter = getenv("TFMET_RENAME_COUNTER");
  if (counter != NULL) {
    long number = number_call(counter, getenv("TFMET_RENAME_LOG"), from, to);
    const char *kill_at = getenv("TFMET_RENAME_KILL_AT");
    if (kill_at != NULL && number == strtol(kill_at, NULL, 10)) kill(getpid(), SIGKILL);
  }
  if (real_rename == NULL) real_rename = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
  return real_rename(from, to);
}
