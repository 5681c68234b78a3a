// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Go crypto/tls: the plaintext of (*tls.Conn).Write and (*tls.Conn).Read
 * in Go programs (Go 1.21 and later), from uprobes that probes/gotls.go
 * places at each function's start and on each of its RET instructions
 * (found by disassembling the function): a uretprobe would replace the
 * return address on the goroutine's stack, which Go's stack copying and
 * unwinding do not expect. The "entry" probes sit on the first
 * instruction after the function's stack check, which runs once per call
 * (the entry runs again after runtime.morestack grew the stack), with the
 * arguments still in their registers.
 *
 * Go's register ABI (ABIInternal, Go 1.17+ on amd64, 1.18+ on arm64):
 *   amd64: arguments in RAX, RBX, RCX, RDI, ...; results in RAX, RBX, ...;
 *          the current goroutine (g) in R14
 *   arm64: arguments and results in R0, R1, ...; g in R28
 * (*Conn).Write(b []byte) (int, error): receiver c = arg 1, b.ptr = arg 2,
 * b.len = arg 3; n = result 1. Read has the same shape.
 *
 * Write sends its plaintext at its start, once the connection's handshake
 * is complete: at that moment the bytes are not yet on the wire, so the
 * event comes before anything the peer does in answer (the peer's next
 * request, read by another goroutine, could otherwise be reported before
 * the response that was written first). Its byte count is then len(b),
 * which Write sends in full unless the connection fails. A Write that
 * makes the handshake itself, and every Read, are reported at their RET:
 * the start saves (c, b.ptr) keyed by the goroutine (the pointer to its g
 * and the process: a goroutine may move between threads during the call);
 * each RET finds them and, when n > 0, sends n bytes from b.ptr: the
 * plaintext written, or read into the buffer. (A buffer on the
 * goroutine's own stack moves if the stack grows during the call; the
 * copy then reads the old place. net/http's buffers are on the heap.)
 *
 * The socket: c's net.Conn field is an interface {itab, data}; if its
 * dynamic type is *net.TCPConn (the type hash in the itab says so), data
 * points to a net.TCPConn{conn{fd *netFD}} and netFD.pfd.Sysfd is the
 * descriptor, which fd_sock resolves in the current task (the goroutine
 * runs in the process that owns the descriptor). The offsets and the type
 * hash depend on the Go release: they come in the uprobe's cookie (see
 * COOKIE_*), packed by user space from its table of layouts.
 */
#include "tls.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#if defined(__TARGET_ARCH_x86)
#define GO_ARG1(r) ((r)->ax)
#define GO_ARG2(r) ((r)->bx)
#define GO_ARG3(r) ((r)->cx)
#define GO_RESULT1(r) ((r)->ax)
#define GO_G(r) ((r)->r14)
#elif defined(__TARGET_ARCH_arm64)
#define GO_ARG1(r) (((struct user_pt_regs *)(r))->regs[0])
#define GO_ARG2(r) (((struct user_pt_regs *)(r))->regs[1])
#define GO_ARG3(r) (((struct user_pt_regs *)(r))->regs[2])
#define GO_RESULT1(r) (((struct user_pt_regs *)(r))->regs[0])
#define GO_G(r) (((struct user_pt_regs *)(r))->regs[28])
#endif

/* The uprobe's cookie: the layout of the binary's Go release.
 *   bits  0-31  type hash of *net.TCPConn
 *   bits 32-43  offset of tls.Conn.vers
 *   bits 44-55  offset of tls.Conn.isHandshakeComplete
 *   bits 56-63  offset of netFD.pfd.Sysfd */
#define COOKIE_TCPCONN_HASH(c) ((__u32)(c))
#define COOKIE_VERS_OFF(c) (((c) >> 32) & 0xfff)
#define COOKIE_HSDONE_OFF(c) (((c) >> 44) & 0xfff)
#define COOKIE_SYSFD_OFF(c) (((c) >> 56) & 0xff)

/* Offsets the same in every supported release (user space checks):
 * tls.Conn.conn, the type hash in an itab (runtime.itab,
 * internal/abi.ITab), and the *netFD in a net.TCPConn. */
#define CONN_CONN_OFF 0
#define ITAB_HASH_OFF 16
#define TCPCONN_NETFD_OFF 0

enum go_op {
	GO_WRITE = 1,
	GO_READ = 2,
};

struct go_call_key {
	__u64 g; /* the goroutine's g */
	__u32 tgid;
	__u32 op; /* enum go_op */
};

struct go_call {
	__u64 conn; /* *tls.Conn */
	__u64 buf;  /* b's data */
};

/* Calls in flight, from entry to return. LRU: a call that never returns
 * (the goroutine panicked, the process died) ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct go_call_key);
	__type(value, struct go_call);
} go_tls_calls SEC(".maps");

/* go_conn_sock returns the TCP socket under a *tls.Conn, or NULL when its
 * net.Conn is not a *net.TCPConn. */
static __always_inline struct sock *go_conn_sock(__u64 conn, __u64 cookie)
{
	struct {
		__u64 itab;
		__u64 data;
	} iface;
	if (bpf_probe_read_user(&iface, sizeof(iface), (void *)(conn + CONN_CONN_OFF)) || !iface.itab || !iface.data)
		return NULL;
	__u32 hash;
	if (bpf_probe_read_user(&hash, sizeof(hash), (void *)(iface.itab + ITAB_HASH_OFF)) ||
	    hash != COOKIE_TCPCONN_HASH(cookie))
		return NULL;
	__u64 netfd;
	if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)(iface.data + TCPCONN_NETFD_OFF)) || !netfd)
		return NULL;
	__s64 fd;
	if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(netfd + COOKIE_SYSFD_OFF(cookie))))
		return NULL;
	return fd_sock(fd);
}

/* go_emit reports n bytes of plaintext at buf on conn's socket. */
static __always_inline void go_emit(__u64 conn, __u64 buf, __s64 n, __u64 cookie, __u8 dir)
{
	if (n <= 0)
		return;
	if (n > 0x7fffffff)
		n = 0x7fffffff;
	struct sock *sk = go_conn_sock(conn, cookie);
	if (!sk)
		return;
	__u16 vers = 0;
	bpf_probe_read_user(&vers, sizeof(vers), (void *)(conn + COOKIE_VERS_OFF(cookie)));
	emit_plain(sk, dir, SOURCE_GO_TLS, (const void *)buf, (__u32)n, vers);
}

/* go_traced applies the process and cgroup filters at a function's entry
 * (emit_plain applies them all again, with the port filter). */
static __always_inline int go_traced(__u32 tgid)
{
	if (tgid == self_tgid)
		return 0;
	if (filter_cgroups) {
		__u64 cgid = bpf_get_current_cgroup_id();
		if (!bpf_map_lookup_elem(&traced_cgroups, &cgid))
			return 0;
	}
	return 1;
}

static __always_inline void go_save(struct pt_regs *ctx, __u32 tgid, __u32 op)
{
	struct go_call_key k = {.g = GO_G(ctx), .tgid = tgid, .op = op};
	struct go_call c = {.conn = GO_ARG1(ctx), .buf = GO_ARG2(ctx)};
	bpf_map_update_elem(&go_tls_calls, &k, &c, BPF_ANY);
}

static __always_inline int go_return(struct pt_regs *ctx, __u32 op, __u8 dir)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct go_call_key k = {.g = GO_G(ctx), .tgid = pid_tgid >> 32, .op = op};
	struct go_call *p = bpf_map_lookup_elem(&go_tls_calls, &k);
	if (!p)
		return 0;
	struct go_call c = *p;
	bpf_map_delete_elem(&go_tls_calls, &k);
	go_emit(c.conn, c.buf, (__s64)GO_RESULT1(ctx), bpf_get_attach_cookie(ctx), dir);
	return 0;
}

SEC("uprobe")
int gotls_wr_enter(struct pt_regs *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!go_traced(tgid))
		return 0;
	__u64 conn = GO_ARG1(ctx), cookie = bpf_get_attach_cookie(ctx);
	__u32 done = 0;
	bpf_probe_read_user(&done, sizeof(done), (void *)(conn + COOKIE_HSDONE_OFF(cookie)));
	if (!done) {
		go_save(ctx, tgid, GO_WRITE);
		return 0;
	}
	/* A call saved earlier whose RET never came (the goroutine panicked
	 * out of Write) must not be taken for this one at its RET. */
	struct go_call_key k = {.g = GO_G(ctx), .tgid = tgid, .op = GO_WRITE};
	bpf_map_delete_elem(&go_tls_calls, &k);
	go_emit(conn, GO_ARG2(ctx), (__s64)GO_ARG3(ctx), cookie, DIR_SEND);
	return 0;
}

SEC("uprobe")
int gotls_wr_ret(struct pt_regs *ctx)
{
	return go_return(ctx, GO_WRITE, DIR_SEND);
}

SEC("uprobe")
int gotls_rd_enter(struct pt_regs *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (go_traced(tgid))
		go_save(ctx, tgid, GO_READ);
	return 0;
}

SEC("uprobe")
int gotls_rd_ret(struct pt_regs *ctx)
{
	return go_return(ctx, GO_READ, DIR_RECV);
}
