/*
 * vbglue: the only C in virtio-bridge (with native/unaccounted-buffer.cc,
 * the one call that needs V8's own API). Syscall glue for Node-API (version 8),
 * nothing else: Unix sockets with fd passing, mmap of an fd into an external
 * ArrayBuffer, sealed memfds and F_GET_SEALS, eventfd, TAP, fallocate, a
 * uv_poll watcher on the calling thread's own loop, and one batched copy (the
 * relay DMA engine's byte mover, told what goes where). Protocol and ring
 * logic live in TypeScript.
 *
 * The typed face of this file is src/native/addon.ts; keep them in step.
 *
 * Conventions:
 *  - Every argument is type-checked (a missing number is a TypeError, never 0;
 *    see references/node-glue.md pitfall 8) and range-checked (RangeError).
 *  - A failing syscall throws an Error whose .code is the errno name and whose
 *    .syscall and message name the call. The documented "would block" cases
 *    return -1 (or 0 for eventfdRead) instead.
 *  - Every fd we create is O_CLOEXEC so nothing leaks into child processes.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include <uv.h>

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* SCM_MAX_FD: the kernel refuses more fds than this in one message. */
#define MAX_FDS 253
/* Node 20 caps an ArrayBuffer at 4 GiB; bigger external buffers fail after
 * Node has already run our finalizer (pitfall 1), so refuse them up front. */
#define MAX_MAP_SIZE 4294967296.0
/* Largest integer a double holds exactly; sizes and offsets stay below it. */
#define MAX_SAFE 9007199254740991.0

#define RETRY_EINTR(var, expr)                                                 \
  do {                                                                         \
    (var) = (expr);                                                            \
  } while ((var) < 0 && errno == EINTR)

/* ------------------------------------------------------------------ errors */

static void throw_with_code(napi_env env, const char *code, const char *msg,
                            const char *syscall) {
  napi_value code_v, msg_v, err, sys_v;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_v) != napi_ok ||
      napi_create_error(env, code_v, msg_v, &err) != napi_ok) {
    napi_throw_error(env, code, msg); /* best effort */
    return;
  }
  if (syscall != NULL &&
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &sys_v) == napi_ok)
    napi_set_named_property(env, err, "syscall", sys_v);
  napi_throw(env, err);
}

/* Throws Error{code: 'ENOENT', syscall} with message "syscall [detail]: text (ENOENT)". */
static napi_value throw_errno(napi_env env, const char *syscall,
                              const char *detail, int err) {
  const char *name = strerrorname_np(err);
  char msg[512];
  if (name == NULL)
    name = "EUNKNOWN";
  snprintf(msg, sizeof msg, "%s%s%s: %s (%s)", syscall, detail ? " " : "",
           detail ? detail : "", strerror(err), name);
  throw_with_code(env, name, msg, syscall);
  return NULL;
}

/* Same for libuv status codes (uv_poll_*), which have their own names. */
static napi_value throw_uv(napi_env env, const char *syscall, int status) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s (%s)", syscall, uv_strerror(status),
           uv_err_name(status));
  throw_with_code(env, uv_err_name(status), msg, syscall);
  return NULL;
}

__attribute__((format(printf, 2, 3))) static napi_value
throw_type(napi_env env, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

__attribute__((format(printf, 2, 3))) static napi_value
throw_range(napi_env env, const char *fmt, ...) {
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
  return NULL;
}

/* A Node-API call failed: surface it unless a JS exception is already pending
 * (the last-error info must be read before napi_is_exception_pending resets it). */
static napi_value fail_napi(napi_env env, const char *what) {
  const napi_extended_error_info *info = NULL;
  bool pending = false;
  char msg[256];
  napi_get_last_error_info(env, &info);
  snprintf(msg, sizeof msg, "%s failed: %s", what,
           info && info->error_message ? info->error_message : "unknown");
  napi_is_exception_pending(env, &pending);
  if (!pending)
    napi_throw_error(env, "ERR_NAPI", msg);
  return NULL;
}

#define NAPI(call)                                                             \
  do {                                                                         \
    if ((call) != napi_ok)                                                     \
      return fail_napi(env, #call);                                            \
  } while (0)

/* --------------------------------------------------------------- arguments */

/* Missing arguments arrive as undefined, so the typeof checks catch them. */
static bool get_args(napi_env env, napi_callback_info info, size_t n,
                     napi_value *argv, napi_value *self) {
  size_t argc = n;
  if (napi_get_cb_info(env, info, &argc, argv, self, NULL) != napi_ok) {
    fail_napi(env, "napi_get_cb_info");
    return false;
  }
  return true;
}

static bool arg_is(napi_env env, napi_value v, napi_valuetype want) {
  napi_valuetype t;
  return napi_typeof(env, v, &t) == napi_ok && t == want;
}

/* An integral number in [min, max]; no coercion of other types. */
static bool arg_int(napi_env env, napi_value v, const char *name, double min,
                    double max, double *out) {
  double d;
  if (!arg_is(env, v, napi_number)) {
    throw_type(env, "%s must be a number", name);
    return false;
  }
  napi_get_value_double(env, v, &d);
  /* NaN fails both comparisons; the cast is exact once d is in range. */
  if (!(d >= min && d <= max) || (double)(int64_t)d != d) {
    throw_range(env, "%s must be an integer in [%.0f, %.0f], got %g", name, min,
                max, d);
    return false;
  }
  *out = d;
  return true;
}

static bool arg_fd(napi_env env, napi_value v, const char *name, int *fd) {
  double d;
  if (!arg_int(env, v, name, 0, 2147483647.0, &d))
    return false;
  *fd = (int)d;
  return true;
}

/* A string without NUL bytes that fits in cap bytes including the NUL. */
static bool arg_str(napi_env env, napi_value v, const char *name, char *buf,
                    size_t cap, bool *too_long) {
  size_t len = 0;
  *too_long = false;
  if (!arg_is(env, v, napi_string)) {
    throw_type(env, "%s must be a string", name);
    return false;
  }
  napi_get_value_string_utf8(env, v, NULL, 0, &len);
  if (len == 0) {
    throw_range(env, "%s must not be empty", name);
    return false;
  }
  if (len >= cap) {
    *too_long = true;
    return false;
  }
  napi_get_value_string_utf8(env, v, buf, cap, &len);
  if (strlen(buf) != len) {
    throw_range(env, "%s must not contain NUL characters", name);
    return false;
  }
  return true;
}

/* buf must be a Uint8Array (Buffer qualifies); [off, off+len) must lie in it. */
static bool arg_bytes(napi_env env, napi_value buf, napi_value off_v,
                      napi_value len_v, double min_len, uint8_t **ptr,
                      size_t *len) {
  bool is_ta = false;
  napi_typedarray_type type;
  size_t length;
  void *data;
  double off, n;
  if (napi_is_typedarray(env, buf, &is_ta) != napi_ok || !is_ta) {
    throw_type(env, "buf must be a Uint8Array");
    return false;
  }
  if (napi_get_typedarray_info(env, buf, &type, &length, &data, NULL, NULL) !=
      napi_ok) {
    fail_napi(env, "napi_get_typedarray_info");
    return false;
  }
  if (type != napi_uint8_array) {
    throw_type(env, "buf must be a Uint8Array");
    return false;
  }
  if (!arg_int(env, off_v, "off", 0, (double)length, &off))
    return false;
  if (!arg_int(env, len_v, "len", min_len, (double)length - off, &n))
    return false;
  *ptr = (uint8_t *)data + (size_t)off; /* data already includes byteOffset */
  *len = (size_t)n;
  return true;
}

/* ----------------------------------------------------------------- results */

static napi_value num(napi_env env, double d) {
  napi_value v;
  NAPI(napi_create_double(env, d, &v));
  return v;
}

static napi_value undef(napi_env env) {
  napi_value v;
  NAPI(napi_get_undefined(env, &v));
  return v;
}

/* The result of a non-blocking transfer: the count, -1 for "would block",
 * or a thrown error. Call right after the syscall, while errno is fresh. */
static napi_value count_or_eagain(napi_env env, ssize_t n, const char *syscall) {
  if (n >= 0)
    return num(env, (double)n);
  if (errno == EAGAIN || errno == EWOULDBLOCK)
    return num(env, -1);
  return throw_errno(env, syscall, NULL, errno);
}

static void close_all(const int *fds, size_t n) {
  for (size_t i = 0; i < n; i++)
    close(fds[i]);
}

/* ----------------------------------------------------------------- sockets */

static bool fill_sun(napi_env env, napi_value v, const char *syscall,
                     struct sockaddr_un *sa) {
  bool too_long;
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  if (!arg_str(env, v, "path", sa->sun_path, sizeof sa->sun_path, &too_long)) {
    if (too_long)
      throw_errno(env, syscall, "(socket path longer than 107 bytes)",
                  ENAMETOOLONG);
    return false;
  }
  return true;
}

/* A socket file left by a dead server refuses connections: remove it so bind
 * can succeed. A live server accepts (or is busy), and bind then fails with
 * EADDRINUSE as it should. */
static void unlink_stale_socket(const struct sockaddr_un *sa) {
  struct stat st;
  int fd, r;
  if (lstat(sa->sun_path, &st) != 0 || !S_ISSOCK(st.st_mode))
    return;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return;
  RETRY_EINTR(r, connect(fd, (const struct sockaddr *)sa, sizeof *sa));
  if (r < 0 && errno == ECONNREFUSED)
    unlink(sa->sun_path);
  close(fd);
}

static napi_value vb_listen(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct sockaddr_un sa;
  double backlog;
  int fd, err;
  if (!get_args(env, info, 2, argv, NULL) ||
      !fill_sun(env, argv[0], "listen", &sa) ||
      !arg_int(env, argv[1], "backlog", 1, 65535, &backlog))
    return NULL;
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return throw_errno(env, "socket", NULL, errno);
  unlink_stale_socket(&sa);
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "bind", sa.sun_path, err);
  }
  if (listen(fd, (int)backlog) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "listen", sa.sun_path, err);
  }
  return num(env, fd);
}

static napi_value vb_accept(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd, c;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  RETRY_EINTR(c, accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC));
  return count_or_eagain(env, c, "accept4");
}

static napi_value vb_connect(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct sockaddr_un sa;
  int fd, r, err, fl;
  if (!get_args(env, info, 1, argv, NULL) ||
      !fill_sun(env, argv[0], "connect", &sa))
    return NULL;
  /* Blocking connect: AF_UNIX connects at once unless the backlog is full;
   * an interrupted AF_UNIX connect leaves the socket unconnected, so retry. */
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return throw_errno(env, "socket", NULL, errno);
  RETRY_EINTR(r, connect(fd, (struct sockaddr *)&sa, sizeof sa));
  if (r < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "connect", sa.sun_path, err);
  }
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "fcntl", NULL, err);
  }
  return num(env, fd);
}

/* recvmsg's fds go onto the caller's array and its result is the count alone:
 * a result object cost a property-name lookup and a shape transition per
 * message, a tenth of a cold vhost-user device stop (docs/BENCHMARKS.md). */
static bool push_fds(napi_env env, napi_value arr, const int *fds, size_t nfds) {
  uint32_t at = 0, len = 0;
  napi_value v;
  size_t i = 0;
  /* An fd counts as handed over once the array's length shows it: a frozen
   * or sealed array ignores the store without an error. */
  if (nfds > 0 && napi_get_array_length(env, arr, &at) == napi_ok)
    for (; i < nfds; i++)
      if (napi_create_int32(env, fds[i], &v) != napi_ok ||
          napi_set_element(env, arr, at + (uint32_t)i, v) != napi_ok ||
          napi_get_array_length(env, arr, &len) != napi_ok ||
          len != at + (uint32_t)i + 1)
        break;
  if (i == nfds)
    return true;
  close_all(fds + i, nfds - i); /* JS never saw these: don't leak */
  fail_napi(env, "recvmsg fds");
  return false;
}

static napi_value vb_recvmsg(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  bool is_arr = false;
  int fd;
  uint8_t *p;
  size_t len;
  ssize_t n;
  union { /* aligned for struct cmsghdr */
    struct cmsghdr hdr;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  } ctl;
  struct iovec iov;
  struct msghdr msg;
  struct cmsghdr *c;
  int fds[MAX_FDS];
  size_t nfds = 0;

  /* len >= 1: a 0-byte read would be indistinguishable from EOF. */
  if (!get_args(env, info, 5, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_bytes(env, argv[1], argv[2], argv[3], 1, &p, &len))
    return NULL;
  /* Checked before the syscall: nothing read is ever dropped for a bad argument. */
  if (napi_is_array(env, argv[4], &is_arr) != napi_ok || !is_arr)
    return throw_type(env, "fds must be an array");
  iov.iov_base = p;
  iov.iov_len = len;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctl.buf;
  msg.msg_controllen = sizeof ctl.buf;
  RETRY_EINTR(n, recvmsg(fd, &msg, MSG_CMSG_CLOEXEC));
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      return num(env, -1);
    return throw_errno(env, "recvmsg", NULL, errno);
  }
  for (c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
      continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    if (k > MAX_FDS - nfds) /* cannot happen with our buffer size */
      k = MAX_FDS - nfds;
    memcpy(fds + nfds, CMSG_DATA(c), k * sizeof(int));
    nfds += k;
  }
  if (msg.msg_flags & MSG_CTRUNC) {
    /* Some fds were dropped by the kernel; the message is unusable. */
    close_all(fds, nfds);
    return throw_errno(env, "recvmsg", "(control data truncated, fds lost)",
                       EMSGSIZE);
  }
  if (!push_fds(env, argv[4], fds, nfds))
    return NULL;
  return num(env, (double)n);
}

static napi_value vb_sendmsg(napi_env env, napi_callback_info info) {
  napi_value argv[5], el;
  int fd;
  uint8_t *p;
  size_t len;
  uint32_t nfds = 0;
  bool is_arr = false;
  int fds[MAX_FDS];
  union {
    struct cmsghdr hdr;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
  } ctl;
  struct iovec iov;
  struct msghdr msg;
  ssize_t n;

  if (!get_args(env, info, 5, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_bytes(env, argv[1], argv[2], argv[3], 0, &p, &len))
    return NULL;
  if (napi_is_array(env, argv[4], &is_arr) != napi_ok || !is_arr)
    return throw_type(env, "fds must be an array of numbers");
  NAPI(napi_get_array_length(env, argv[4], &nfds));
  if (nfds > MAX_FDS)
    return throw_range(env, "at most %d fds per message, got %u", MAX_FDS, nfds);
  for (uint32_t i = 0; i < nfds; i++) {
    NAPI(napi_get_element(env, argv[4], i, &el));
    if (!arg_fd(env, el, "fds[i]", &fds[i]))
      return NULL;
  }
  /* A stream socket carries fds only along with at least one byte. */
  if (nfds > 0 && len == 0)
    return throw_range(env, "len must be >= 1 when fds are sent");

  iov.iov_base = p;
  iov.iov_len = len;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (nfds > 0) {
    memset(&ctl, 0, sizeof ctl);
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  RETRY_EINTR(n, sendmsg(fd, &msg, MSG_NOSIGNAL));
  return count_or_eagain(env, n, "sendmsg");
}

static napi_value vb_socketpair(napi_env env, napi_callback_info info) {
  int sv[2];
  napi_value arr, a, b;
  (void)info;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
    return throw_errno(env, "socketpair", NULL, errno);
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok ||
      napi_create_int32(env, sv[0], &a) != napi_ok ||
      napi_create_int32(env, sv[1], &b) != napi_ok ||
      napi_set_element(env, arr, 0, a) != napi_ok ||
      napi_set_element(env, arr, 1, b) != napi_ok) {
    close_all(sv, 2);
    return fail_napi(env, "socketpair result");
  }
  return arr;
}

/* --------------------------------------------------------------- plain fds */

static napi_value vb_close(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  /* On Linux the fd is gone even when close reports EINTR: never retry. */
  if (close(fd) < 0 && errno != EINTR)
    return throw_errno(env, "close", NULL, errno);
  return undef(env);
}

static napi_value vb_dup(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd, d;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0)
    return throw_errno(env, "dup", NULL, errno);
  return num(env, d);
}

static napi_value vb_set_nonblocking(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd, fl;
  bool on;
  if (!get_args(env, info, 2, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  if (!arg_is(env, argv[1], napi_boolean))
    return throw_type(env, "on must be a boolean");
  napi_get_value_bool(env, argv[1], &on);
  fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK) < 0)
    return throw_errno(env, "fcntl", NULL, errno);
  return undef(env);
}

static napi_value vb_read(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  uint8_t *p;
  size_t len;
  ssize_t n;
  /* len >= 1 for the same reason as recvmsg: 0 must mean EOF. */
  if (!get_args(env, info, 4, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_bytes(env, argv[1], argv[2], argv[3], 1, &p, &len))
    return NULL;
  RETRY_EINTR(n, read(fd, p, len));
  return count_or_eagain(env, n, "read");
}

static napi_value vb_write(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  uint8_t *p;
  size_t len;
  ssize_t n;
  if (!get_args(env, info, 4, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_bytes(env, argv[1], argv[2], argv[3], 0, &p, &len))
    return NULL;
  RETRY_EINTR(n, write(fd, p, len));
  return count_or_eagain(env, n, "write");
}

static napi_value vb_fd_size(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  struct stat st;
  int fd;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  if (fstat(fd, &st) < 0)
    return throw_errno(env, "fstat", NULL, errno);
  return num(env, (double)st.st_size);
}

/* Node's fs has no fallocate; virtio-blk needs it to punch holes (discard)
 * and zero ranges without writing. The mode bits go to the kernel as given. */
static napi_value vb_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd, r;
  double mode, off, len;
  if (!get_args(env, info, 4, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_int(env, argv[1], "mode", 0, 2147483647.0, &mode) ||
      !arg_int(env, argv[2], "offset", 0, MAX_SAFE, &off) ||
      !arg_int(env, argv[3], "len", 1, MAX_SAFE, &len))
    return NULL;
  RETRY_EINTR(r, fallocate(fd, (int)mode, (off_t)off, (off_t)len));
  if (r < 0)
    return throw_errno(env, "fallocate", NULL, errno);
  return undef(env);
}

/* ------------------------------------------------------------ copy burst */

/* An ArrayBuffer's data and length; napi_get_typedarray_info costs about six
 * times as much, and a burst's call takes six arrays. */
static bool arg_buffer(napi_env env, napi_value v, const char *name,
                       uint8_t **data, size_t *len) {
  void *d;
  if (napi_get_arraybuffer_info(env, v, &d, len) != napi_ok) {
    throw_type(env, "%s must be an ArrayBuffer", name);
    return false;
  }
  *data = d;
  return true;
}

/* A number, no coercion; range checks are the caller's. */
static bool arg_num(napi_env env, napi_value v, const char *name, double *out) {
  if (napi_get_value_double(env, v, out) != napi_ok) {
    throw_type(env, "%s must be a number", name);
    return false;
  }
  return true;
}

/*
 * copyBurst(src, shift, srcLo, srcHi, dst, dstLo, dstHi, addrs, lens, offs,
 * first, n): a DMA engine's byte mover, one call for a burst of buffers.
 * addrs and offs are Float64Arrays' buffers, lens a Uint32Array's. For i from
 * first while i < n, copies lens[i] bytes from src at addrs[i] + shift to dst
 * at dstLo + offs[i], as long as the source lies in [srcLo, srcHi) and the
 * destination in [dstLo, dstHi); returns the i it stopped at. The caller
 * decides what to copy and takes a buffer refused here its own way.
 * memmove: the two buffers may view the same memory.
 */
static napi_value vb_copy_burst(napi_env env, napi_callback_info info) {
  napi_value argv[12];
  uint8_t *src, *dst, *addrs_b, *lens_b, *offs_b;
  size_t src_len, dst_len, addrs_len, lens_len, offs_len;
  double shift, src_lo, src_hi, dst_lo, dst_hi, first, n;
  const double *addrs, *offs;
  const uint32_t *lens;
  size_t i;
  if (!get_args(env, info, 12, argv, NULL) ||
      !arg_buffer(env, argv[0], "src", &src, &src_len) ||
      !arg_num(env, argv[1], "shift", &shift) ||
      !arg_num(env, argv[2], "srcLo", &src_lo) ||
      !arg_num(env, argv[3], "srcHi", &src_hi) ||
      !arg_buffer(env, argv[4], "dst", &dst, &dst_len) ||
      !arg_num(env, argv[5], "dstLo", &dst_lo) ||
      !arg_num(env, argv[6], "dstHi", &dst_hi) ||
      !arg_buffer(env, argv[7], "addrs", &addrs_b, &addrs_len) ||
      !arg_buffer(env, argv[8], "lens", &lens_b, &lens_len) ||
      !arg_buffer(env, argv[9], "offs", &offs_b, &offs_len) ||
      !arg_num(env, argv[10], "first", &first) ||
      !arg_num(env, argv[11], "n", &n))
    return NULL;
  /* NaN fails every comparison, and each cast follows the checks that make
   * it exact (a double out of an integer type's range is undefined in C). */
  if (!(src_lo >= 0 && src_lo <= src_hi && src_hi <= (double)src_len &&
        dst_lo >= 0 && dst_lo <= dst_hi && dst_hi <= (double)dst_len &&
        shift >= -MAX_SAFE && shift <= MAX_SAFE &&
        (double)(int64_t)shift == shift)) {
    throw_range(env, "copyBurst: a window outside its buffer");
    return NULL;
  }
  if (!(first >= 0 && first <= n && n * 8 <= (double)addrs_len &&
        n * 4 <= (double)lens_len && n * 8 <= (double)offs_len &&
        (double)(size_t)first == first && (double)(size_t)n == n)) {
    throw_range(env, "copyBurst: first (%g) or n (%g) outside the arrays",
                 first, n);
    return NULL;
  }
  /* An ArrayBuffer's data is at least 8-aligned (V8's allocator, and mmap). */
  addrs = (const double *)(void *)addrs_b;
  offs = (const double *)(void *)offs_b;
  lens = (const uint32_t *)(void *)lens_b;
  for (i = (size_t)first; i < (size_t)n; i++) {
    double l = (double)lens[i], s = addrs[i] + shift, d = dst_lo + offs[i];
    if (!(s >= src_lo && s + l <= src_hi && d >= dst_lo && d + l <= dst_hi &&
          (double)(size_t)s == s && (double)(size_t)d == d))
      break;
    memmove(dst + (size_t)d, src + (size_t)s, (size_t)l);
  }
  return num(env, (double)i);
}

/* -------------------------------------------------------------------- mmap */

/*
 * One record per mapping, napi_wrap'ed onto its ArrayBuffer, so unmap() can
 * find it, and owned by the wrap's finalizer (which always frees it). unmap()
 * munmaps early and clears addr so the finalizer, which Node runs later, does
 * not munmap a range that may by then belong to a new mapping.
 */
typedef struct {
  void *addr; /* NULL once unmap() released the range */
  size_t len;
} mapping;

/* Marks our ArrayBuffers, so unmap() never trusts another addon's wrap. */
static const napi_type_tag mapping_tag = {0x766267c7565d6d6dULL,
                                          0x6170000000000001ULL};

/* native/unaccounted-buffer.cc: an ArrayBuffer over addr that V8 neither
 * frees nor counts as external memory (why: there). */
napi_value vb_unaccounted_arraybuffer(void *data, size_t len);

/* The wrap's finalizer: runs once the ArrayBuffer is collected. */
static void mapping_finalize(napi_env env, void *data, void *hint) {
  mapping *m = data;
  (void)env;
  (void)hint;
  if (m->addr != NULL)
    munmap(m->addr, m->len);
  free(m);
}

static napi_value vb_mmap(napi_env env, napi_callback_info info) {
  napi_value argv[3], ab;
  int fd;
  double size, off;
  void *addr;
  mapping *m;
  struct stat st;
  long page = sysconf(_SC_PAGESIZE);
  if (!get_args(env, info, 3, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_int(env, argv[1], "size", 1, MAX_MAP_SIZE, &size) ||
      !arg_int(env, argv[2], "offset", 0, MAX_SAFE, &off))
    return NULL;
  if ((int64_t)off % page != 0)
    return throw_range(env, "offset must be a multiple of the page size (%ld)",
                       page);
  /* Touching a page past the end of a file is SIGBUS, which kills the whole
   * process: refuse what is certain to fault. (Devices report no size; a
   * later truncation by a peer still faults, see pitfall 7: callers mapping
   * a peer's memfd check seals() for F_SEAL_SHRINK first.) */
  if (fstat(fd, &st) < 0)
    return throw_errno(env, "mmap", "(fstat)", errno);
  if (S_ISREG(st.st_mode) && off + size > (double)st.st_size) {
    char detail[96];
    snprintf(detail, sizeof detail, "(offset+size %.0f beyond the file's %lld bytes)",
             off + size, (long long)st.st_size);
    return throw_errno(env, "mmap", detail, EINVAL);
  }
  addr = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
              (off_t)off);
  if (addr == MAP_FAILED)
    return throw_errno(env, "mmap", NULL, errno);
  m = malloc(sizeof *m);
  if (m == NULL) {
    munmap(addr, (size_t)size);
    return throw_errno(env, "mmap", "(record)", ENOMEM);
  }
  m->addr = addr;
  m->len = (size_t)size;
  ab = vb_unaccounted_arraybuffer(addr, (size_t)size);
  /* Once wrapped, the finalizer owns addr and m; until then, nothing does. */
  if (napi_wrap(env, ab, m, mapping_finalize, NULL, NULL) != napi_ok) {
    munmap(addr, (size_t)size);
    free(m);
    return fail_napi(env, "napi_wrap");
  }
  /* If this fails, GC still unmaps via the finalizer. */
  NAPI(napi_type_tag_object(env, ab, &mapping_tag));
  return ab;
}

static napi_value vb_unmap(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  bool is_ab = false, detached = false, ours = false;
  void *rec;
  mapping *m;
  void *addr;
  size_t len;
  if (!get_args(env, info, 1, argv, NULL))
    return NULL;
  if (napi_is_arraybuffer(env, argv[0], &is_ab) != napi_ok || !is_ab)
    return throw_type(env, "buf must be an ArrayBuffer returned by mmap()");
  NAPI(napi_is_detached_arraybuffer(env, argv[0], &detached));
  /* Already unmapped: a no-op. Checked before unwrap because the record may
   * already be freed once the buffer is detached. */
  if (detached)
    return undef(env);
  if (napi_check_object_type_tag(env, argv[0], &mapping_tag, &ours) !=
          napi_ok ||
      !ours || napi_unwrap(env, argv[0], &rec) != napi_ok)
    return throw_type(env, "buf must be an ArrayBuffer returned by mmap()");
  m = rec;
  addr = m->addr;
  len = m->len;
  /* Clear first: the wrap's finalizer, whenever the buffer is collected,
   * must find nothing left to munmap. */
  m->addr = NULL;
  if (napi_detach_arraybuffer(env, argv[0]) != napi_ok) {
    m->addr = addr;
    return fail_napi(env, "napi_detach_arraybuffer");
  }
  /* Views now have length 0, so no JS access can reach the range. (The
   * backing store's deleter is empty: detaching freed nothing.) */
  if (munmap(addr, len) < 0)
    return throw_errno(env, "munmap", NULL, errno);
  return undef(env);
}

/* ------------------------------------------------------- memfd and eventfd */

static napi_value vb_memfd(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  char name[250]; /* memfd names are at most 249 bytes */
  bool too_long;
  double size;
  int fd, r, err;
  if (!get_args(env, info, 2, argv, NULL))
    return NULL;
  if (!arg_str(env, argv[0], "name", name, sizeof name, &too_long)) {
    if (too_long)
      throw_range(env, "name must be at most %zu bytes", sizeof name - 1);
    return NULL;
  }
  if (!arg_int(env, argv[1], "size", 0, MAX_SAFE, &size))
    return NULL;
  fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0)
    return throw_errno(env, "memfd_create", NULL, errno);
  RETRY_EINTR(r, ftruncate(fd, (off_t)size));
  if (r < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "ftruncate", NULL, err);
  }
  /* Every memfd we make is handed to a peer. Sealed, that peer can no longer
   * shrink it under our mappings (SIGBUS, pitfall 7), grow it, or undo the
   * seals; the size is fixed from here on. */
  if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "fcntl", "(F_ADD_SEALS)", err);
  }
  return num(env, fd);
}

/* F_GET_SEALS; 0 when the fd cannot carry seals (EINVAL: not a tmpfs or
 * hugetlbfs file). Any other tmpfs file, e.g. in /dev/shm, or a memfd made
 * without MFD_ALLOW_SEALING reports just F_SEAL_SEAL. */
static napi_value vb_seals(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd, s;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  s = fcntl(fd, F_GET_SEALS);
  if (s < 0) {
    if (errno == EINVAL)
      return num(env, 0);
    return throw_errno(env, "fcntl", "(F_GET_SEALS)", errno);
  }
  return num(env, s);
}

static napi_value vb_eventfd(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  double init;
  int fd;
  if (!get_args(env, info, 1, argv, NULL) ||
      !arg_int(env, argv[0], "initval", 0, 4294967295.0, &init))
    return NULL;
  fd = eventfd((unsigned int)init, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0)
    return throw_errno(env, "eventfd", NULL, errno);
  return num(env, fd);
}

/* Counters above 2^53 lose precision as a JS number; we never get near. */
static napi_value vb_eventfd_read(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  uint64_t v;
  ssize_t n;
  int fd;
  if (!get_args(env, info, 1, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  RETRY_EINTR(n, read(fd, &v, sizeof v));
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK)
      return num(env, 0);
    return throw_errno(env, "read", "(eventfd)", errno);
  }
  if (n != sizeof v)
    return throw_errno(env, "read", "(eventfd: short read)", EINVAL);
  return num(env, (double)v);
}

static napi_value vb_eventfd_write(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  double value;
  uint64_t v;
  ssize_t n;
  int fd;
  if (!get_args(env, info, 2, argv, NULL) || !arg_fd(env, argv[0], "fd", &fd) ||
      !arg_int(env, argv[1], "value", 0, MAX_SAFE, &value))
    return NULL;
  v = (uint64_t)value;
  /* EAGAIN (counter would overflow) is an error here, not a silent drop. */
  RETRY_EINTR(n, write(fd, &v, sizeof v));
  if (n < 0)
    return throw_errno(env, "write", "(eventfd)", errno);
  if (n != sizeof v)
    return throw_errno(env, "write", "(eventfd: short write)", EINVAL);
  return undef(env);
}

/* --------------------------------------------------------------------- tap */

/* tapOpen(name, vnetHdrSize): with a size (10..), every frame read or written
 * is preceded by a virtio_net_hdr of that many bytes (IFF_VNET_HDR). */
static napi_value vb_tap_open(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  struct ifreq ifr;
  bool too_long;
  double hdr;
  int fd, err, sz;
  if (!get_args(env, info, 2, argv, NULL))
    return NULL;
  memset(&ifr, 0, sizeof ifr);
  if (!arg_str(env, argv[0], "name", ifr.ifr_name, IFNAMSIZ, &too_long)) {
    if (too_long)
      throw_range(env, "name must be at most %d bytes", IFNAMSIZ - 1);
    return NULL;
  }
  if (!arg_int(env, argv[1], "vnetHdrSize", 0, 64, &hdr))
    return NULL;
  fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0)
    return throw_errno(env, "open", "/dev/net/tun", errno);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (hdr > 0 ? IFF_VNET_HDR : 0);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "ioctl", "(TUNSETIFF)", err);
  }
  sz = (int)hdr;
  if (sz > 0 && ioctl(fd, TUNSETVNETHDRSZ, &sz) < 0) {
    err = errno;
    close(fd);
    return throw_errno(env, "ioctl", "(TUNSETVNETHDRSZ)", err);
  }
  return num(env, fd);
}

/* tapSetOffload(fd, flags): TUNSETOFFLOAD with TUN_F_* bits, the offloads the
 * kernel may hand us (and the TAP interface then advertises). */
static napi_value vb_tap_set_offload(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  double flags;
  int fd;
  if (!get_args(env, info, 2, argv, NULL))
    return NULL;
  if (!arg_fd(env, argv[0], "fd", &fd) ||
      !arg_int(env, argv[1], "flags", 0, 65535, &flags))
    return NULL;
  if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0)
    return throw_errno(env, "ioctl", "(TUNSETOFFLOAD)", errno);
  return undef(env);
}

/* ------------------------------------------------------------------ Poller */

/*
 * new Poller(fd, cb): a uv_poll_t on the loop of the env that created it.
 * napi_get_uv_event_loop gives each worker_thread its own loop; using
 * uv_default_loop from a worker is what aborts V8 (pitfall 4).
 *
 * Lifetime: the struct is shared by the JS object (through napi_wrap) and by
 * libuv (until uv_close's callback), and is freed when both have let go. The
 * JS-facing parts (references, async context, cleanup hook) are released
 * synchronously by close(), by GC of a stopped poller, or by the env cleanup
 * hook at teardown; never from the uv close callback, which may run after
 * the napi_env is gone.
 */
typedef struct {
  uv_poll_t handle;
  napi_env env;
  napi_ref self; /* weak while stopped; strong while started, so a watching
                    poller is not collected and its callback stays reachable */
  napi_ref cb;   /* weak: the object's read-only "callback" holds it; looked up
                    by name on every poll, it cost a string-table probe each
                    time, which a cold control message pays in cache misses */
  napi_async_context actx;
  bool active;      /* started; self is strong */
  bool wrapped;     /* the JS object still points at us */
  bool closing;     /* uv_close called */
  bool closed;      /* uv_close callback ran */
  bool js_released; /* references, async context and hook are gone */
  bool dispatching; /* inside napi_make_callback, which is using actx */
} poller;

static const napi_type_tag poller_tag = {0x766267c7565d506fULL,
                                         0x6c6c657200000001ULL};

static void poller_maybe_free(poller *p) {
  if (!p->wrapped && p->closed)
    free(p);
}

static void poller_on_close(uv_handle_t *h) {
  poller *p = h->data;
  p->closed = true;
  poller_maybe_free(p);
}

static void poller_cleanup_hook(void *arg);

static void poller_release_js(poller *p, bool from_hook) {
  /* Destroying the async context under a running callback would pull it out
   * from under napi_make_callback: on_poll finishes the job afterwards. */
  if (p->js_released || p->dispatching)
    return;
  p->js_released = true;
  if (!from_hook)
    napi_remove_env_cleanup_hook(p->env, poller_cleanup_hook, p);
  if (p->self != NULL)
    napi_delete_reference(p->env, p->self);
  if (p->cb != NULL)
    napi_delete_reference(p->env, p->cb);
  if (p->actx != NULL)
    napi_async_destroy(p->env, p->actx);
  p->self = NULL;
  p->cb = NULL;
  p->actx = NULL;
}

static void poller_close(poller *p, bool from_hook) {
  if (!p->closing) {
    p->closing = true;
    p->active = false;
    /* uv_close stops the watcher and drops it from the loop at once, so the
     * fd can get a new Poller right away. */
    uv_close((uv_handle_t *)&p->handle, poller_on_close);
  }
  poller_release_js(p, from_hook);
}

/* The env is going away (worker exit or process exit). */
static void poller_cleanup_hook(void *arg) { poller_close(arg, true); }

/* The JS object was collected (only possible while stopped) or the env is
 * being torn down. */
static void poller_finalize(napi_env env, void *data, void *hint) {
  poller *p = data;
  (void)env;
  (void)hint;
  p->wrapped = false;
  poller_close(p, false);
  poller_maybe_free(p);
}

static void poller_on_poll(uv_poll_t *h, int status, int events) {
  poller *p = h->data;
  napi_env env = p->env;
  napi_handle_scope scope;
  napi_value self, cb, argv[2], result, exc;
  napi_status st;
  bool pending = false;
  if (p->closing || p->self == NULL)
    return;
  if (napi_open_handle_scope(env, &scope) != napi_ok)
    return;
  if (napi_get_reference_value(env, p->self, &self) == napi_ok && self != NULL &&
      napi_get_reference_value(env, p->cb, &cb) == napi_ok && cb != NULL &&
      napi_create_int32(env, status, &argv[0]) == napi_ok &&
      napi_create_int32(env, events, &argv[1]) == napi_ok) {
    /* napi_make_callback (not napi_call_function): runs async hooks and
     * drains process.nextTick and microtasks, as any libuv callback must. */
    p->dispatching = true;
    st = napi_make_callback(env, p->actx, self, cb, 2, argv, &result);
    p->dispatching = false;
    /* No JS frame below us could catch what cb threw: report it as uncaught
     * ('uncaughtException' on the main thread, 'error' on a Worker). */
    if (st != napi_ok && napi_is_exception_pending(env, &pending) == napi_ok &&
        pending && napi_get_and_clear_last_exception(env, &exc) == napi_ok)
      napi_fatal_exception(env, exc);
  }
  if (p->closing) /* cb called close() */
    poller_release_js(p, false);
  napi_close_handle_scope(env, scope);
}

/* *out = NULL when the Poller was closed; throws when self is no Poller. */
static bool poller_this(napi_env env, napi_value self, poller **out) {
  bool ok = false;
  void *p = NULL;
  if (napi_check_object_type_tag(env, self, &poller_tag, &ok) != napi_ok || !ok) {
    throw_type(env, "this is not a Poller");
    return false;
  }
  *out = napi_unwrap(env, self, &p) == napi_ok ? p : NULL;
  return true;
}

static napi_value poller_new(napi_env env, napi_callback_info info) {
  napi_value argv[2], self, target, name;
  napi_property_descriptor cb_prop;
  uv_loop_t *loop;
  poller *p;
  int fd, r;
  NAPI(napi_get_new_target(env, info, &target));
  if (target == NULL)
    return throw_type(env, "Poller must be called with new");
  if (!get_args(env, info, 2, argv, &self) || !arg_fd(env, argv[0], "fd", &fd))
    return NULL;
  if (!arg_is(env, argv[1], napi_function))
    return throw_type(env, "cb must be a function");
  NAPI(napi_get_uv_event_loop(env, &loop));
  /* cb lives on the object (read-only, hidden from enumeration), not in a
   * strong reference: that would be a GC root, and cb usually closes over
   * the poller, which could then never be collected. */
  memset(&cb_prop, 0, sizeof cb_prop);
  cb_prop.utf8name = "callback";
  cb_prop.value = argv[1];
  cb_prop.attributes = napi_default;
  NAPI(napi_define_properties(env, self, 1, &cb_prop));
  NAPI(napi_type_tag_object(env, self, &poller_tag));

  p = calloc(1, sizeof *p);
  if (p == NULL)
    return throw_errno(env, "Poller", NULL, ENOMEM);
  /* Fails with EEXIST when this loop already watches fd (one owner per fd,
   * pitfall 9), EPERM for fds epoll cannot watch (regular files). Note that
   * it also sets O_NONBLOCK on fd. */
  r = uv_poll_init(loop, &p->handle, fd);
  if (r < 0) {
    free(p);
    return throw_uv(env, "uv_poll_init", r);
  }
  p->handle.data = p;
  p->env = env;
  if (napi_create_string_utf8(env, "vbglue.Poller", NAPI_AUTO_LENGTH,
                              &name) != napi_ok ||
      napi_create_reference(env, self, 0, &p->self) != napi_ok ||
      napi_create_reference(env, argv[1], 0, &p->cb) != napi_ok ||
      napi_async_init(env, self, name, &p->actx) != napi_ok ||
      napi_add_env_cleanup_hook(env, poller_cleanup_hook, p) != napi_ok ||
      napi_wrap(env, self, p, poller_finalize, NULL, NULL) != napi_ok) {
    fail_napi(env, "Poller");
    poller_close(p, false); /* not wrapped: freed by the close callback */
    return NULL;
  }
  p->wrapped = true;
  return self;
}

static napi_value poller_start(napi_env env, napi_callback_info info) {
  napi_value argv[1], self;
  double ev;
  poller *p;
  int r;
  if (!get_args(env, info, 1, argv, &self) || !poller_this(env, self, &p))
    return NULL;
  if (p == NULL)
    return throw_errno(env, "Poller.start", "(closed)", EBADF);
  if (!arg_int(env, argv[0], "events", UV_READABLE, UV_READABLE | UV_WRITABLE,
               &ev))
    return NULL;
  r = uv_poll_start(&p->handle, (int)ev, poller_on_poll);
  if (r < 0)
    return throw_uv(env, "uv_poll_start", r);
  if (!p->active) {
    NAPI(napi_reference_ref(env, p->self, NULL));
    p->active = true;
  }
  return undef(env);
}

static napi_value poller_stop(napi_env env, napi_callback_info info) {
  napi_value self;
  poller *p;
  if (!get_args(env, info, 0, NULL, &self) || !poller_this(env, self, &p))
    return NULL;
  if (p != NULL && p->active) {
    uv_poll_stop(&p->handle);
    p->active = false;
    NAPI(napi_reference_unref(env, p->self, NULL));
  }
  return undef(env);
}

static napi_value poller_close_js(napi_env env, napi_callback_info info) {
  napi_value self;
  poller *p;
  if (!get_args(env, info, 0, NULL, &self) || !poller_this(env, self, &p))
    return NULL;
  if (p != NULL) { /* a second close() is a no-op */
    NAPI(napi_remove_wrap(env, self, NULL)); /* the finalizer won't run now */
    p->wrapped = false;
    poller_close(p, false);
  }
  return undef(env);
}

/* ------------------------------------------------------------------ module */

#define FN(name, fn) {name, NULL, fn, NULL, NULL, NULL, napi_enumerable, NULL}

NAPI_MODULE_INIT() {
  napi_property_descriptor fns[] = {
      FN("listen", vb_listen),
      FN("accept", vb_accept),
      FN("connect", vb_connect),
      FN("recvmsg", vb_recvmsg),
      FN("sendmsg", vb_sendmsg),
      FN("socketpair", vb_socketpair),
      FN("close", vb_close),
      FN("dup", vb_dup),
      FN("setNonBlocking", vb_set_nonblocking),
      FN("mmap", vb_mmap),
      FN("unmap", vb_unmap),
      FN("memfd", vb_memfd),
      FN("seals", vb_seals),
      FN("eventfd", vb_eventfd),
      FN("eventfdRead", vb_eventfd_read),
      FN("eventfdWrite", vb_eventfd_write),
      FN("read", vb_read),
      FN("write", vb_write),
      FN("tapOpen", vb_tap_open),
      FN("tapSetOffload", vb_tap_set_offload),
      FN("fdSize", vb_fd_size),
      FN("fallocate", vb_fallocate),
      FN("copyBurst", vb_copy_burst),
  };
  napi_property_descriptor methods[] = {
      {"start", NULL, poller_start, NULL, NULL, NULL, napi_default, NULL},
      {"stop", NULL, poller_stop, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, poller_close_js, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_value cls;
  NAPI(napi_define_class(env, "Poller", NAPI_AUTO_LENGTH, poller_new, NULL,
                         sizeof methods / sizeof methods[0], methods, &cls));
  NAPI(napi_define_properties(env, exports, sizeof fns / sizeof fns[0], fns));
  NAPI(napi_set_named_property(env, exports, "Poller", cls));
  return exports;
}
