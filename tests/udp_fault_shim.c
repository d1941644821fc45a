/*
 * A fault injector for the native UDP receiver, preloaded into the proxy
 * (LD_PRELOAD) by tests/udp_receiver_faults_test.ts, which compiles it with
 * `cc -shared -fPIC`.
 *
 * Deno's FFI finds libc's functions with dlsym(handle, name), which searches
 * libc itself, never a preloaded library: so this shim wraps dlsym, and hands
 * out its own ppoll or recvmmsg for the one named in FAULT_CALL. Those fail
 * with errno FAULT_ERRNO (ENOSYS when unset), always, or only while the file
 * FAULT_WHILE_FILE exists (checked at each call), and otherwise call libc's.
 * Deno's own calls (through its PLT, not dlsym) are left alone.
 *
 * glibc only (dlvsym, symbol versions).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef void *(*dlsym_fn)(void *, const char *);
typedef int (*recvmmsg_fn)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
typedef int (*ppoll_fn)(struct pollfd *, nfds_t, const struct timespec *, const sigset_t *);

static dlsym_fn real_dlsym;
static recvmmsg_fn real_recvmmsg;
static ppoll_fn real_ppoll;

/* Whether `name` is to fail now. */
static int failing(const char *name) {
  const char *call = getenv("FAULT_CALL");
  if (call == NULL || strcmp(call, name) != 0) return 0;
  const char *file = getenv("FAULT_WHILE_FILE");
  return file == NULL || access(file, F_OK) == 0;
}

static int fault_errno(void) {
  const char *text = getenv("FAULT_ERRNO");
  return text == NULL ? ENOSYS : atoi(text);
}

static int fault_recvmmsg(int fd, struct mmsghdr *vec, unsigned int n, int flags,
                          struct timespec *timeout) {
  if (failing("recvmmsg")) {
    errno = fault_errno();
    return -1;
  }
  return real_recvmmsg(fd, vec, n, flags, timeout);
}

static int fault_ppoll(struct pollfd *fds, nfds_t n, const struct timespec *timeout,
                       const sigset_t *mask) {
  if (failing("ppoll")) {
    errno = fault_errno();
    return -1;
  }
  return real_ppoll(fds, n, timeout, mask);
}

void *dlsym(void *handle, const char *name) {
  if (real_dlsym == NULL) {
    static const char *const versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17"};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0] && real_dlsym == NULL; i++) {
      real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
    }
    if (real_dlsym == NULL) abort();
  }
  void *found = real_dlsym(handle, name);
  if (found == NULL) return NULL;
  if (strcmp(name, "recvmmsg") == 0) {
    real_recvmmsg = (recvmmsg_fn)found;
    return (void *)fault_recvmmsg;
  }
  if (strcmp(name, "ppoll") == 0) {
    real_ppoll = (ppoll_fn)found;
    return (void *)fault_ppoll;
  }
  return found;
}
