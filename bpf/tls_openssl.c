//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * OpenSSL plaintext: uprobes on SSL_write, SSL_write_ex, SSL_read and
 * SSL_read_ex (entry and return) of libssl (1.1.x, 3.x, static copies, and
 * libraries of the same API such as BoringSSL).
 *
 * Entry saves the call's arguments per thread; the return reports the
 * bytes the call really moved (ret > 0, or *written / *readbytes when the
 * _ex form returned 1) with emit_plain, bound to the socket underneath.
 *
 * Which socket: every uprobe carries a 64-bit attach cookie that user space
 * makes from the library's version (see probes/openssl.go):
 *   bits  0..15  offset of the version field in the SSL object
 *   bits 16..31  offset of rbio (wbio follows it)
 *   bits 32..39  offset of num (the descriptor) in a BIO
 *   bits 40..47  offset of method in a BIO
 *   bit  56      the call sends (SSL_write*), else it receives
 *   bit  57      the _ex form (a size_t * of the byte count in arg 4)
 *   bit  63      the layout above is known
 * With a known layout the SSL's BIO is read: when it is a descriptor BIO
 * (socket, fd, connect, accept: BIO_TYPE_DESCRIPTOR in its method's type)
 * its num is the descriptor, and fd_sock() finds the socket. Otherwise
 * (a custom BIO, as curl's, a memory BIO, an unknown layout, BoringSSL)
 * the socket is the one the thread did I/O on during the call, seen by this
 * object's own sock_send_length / sock_recv_length programs (Linux 6.3+;
 * before, the trace events of the read and write system calls' entries),
 * which user space loads and attaches only once some library is probed,
 * and which do nothing but one hash lookup for threads outside an SSL
 * call. Either way the
 * socket found is remembered per SSL object, for calls that do no I/O (a
 * read served from a record already received).
 *
 * Nesting: some versions implement one entry point through another
 * (SSL_write_ex through SSL_write, or the reverse). Each application call
 * is reported once, by its outermost function: a nested entry (deeper
 * stack) keeps the outer call's record, a nested return (deeper stack)
 * is ignored. A record whose return was never seen (the uretprobe was
 * attached after the entry) is replaced by the next call at the same or a
 * shallower stack depth.
 */
#include "tls.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define COOKIE_VERSION_OFF(c) ((c)&0xffff)
#define COOKIE_RBIO_OFF(c) (((c) >> 16) & 0xffff)
#define COOKIE_BIO_NUM_OFF(c) (((c) >> 32) & 0xff)
#define COOKIE_BIO_METHOD_OFF(c) (((c) >> 40) & 0xff)
#define COOKIE_SEND (1ULL << 56)
#define COOKIE_EX (1ULL << 57)
#define COOKIE_LAYOUT (1ULL << 63)

#define BIO_TYPE_DESCRIPTOR 0x0100

/* Counters of this object (index: enum ssl_stat). */
enum ssl_stat {
	SSL_STAT_CALLS = 0,      /* calls that moved bytes */
	SSL_STAT_BY_FD = 1,      /* ... bound through the BIO's descriptor */
	SSL_STAT_BY_IO = 2,      /* ... bound through the thread's socket I/O in the call */
	SSL_STAT_BY_CACHE = 3,   /* ... bound through the SSL object's last socket */
	SSL_STAT_UNBOUND = 4,    /* ... with no socket found (not reported) */
	SSL_STAT_NESTED = 5,     /* nested entries (reported by the outer call) */
	SSL_STAT_BAD_LAYOUT = 6, /* SSL objects whose version field made no sense */
	SSL_STAT_MAX = 8,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SSL_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ssl_stats SEC(".maps");

static __always_inline void ssl_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ssl_stats, &idx);
	if (v)
		*v += 1;
}

/* One SSL call in progress, per thread. */
struct ssl_call {
	__u64 ssl;    /* the SSL * */
	__u64 buf;    /* the application's buffer */
	__u64 nbytes; /* _ex: the size_t * of the byte count, else 0 */
	__u64 sp;     /* stack pointer at entry */
	__u64 cookie; /* the entry's attach cookie */
	__u64 sk;     /* socket the thread did I/O on during the call */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* pid_tgid */
	__type(value, struct ssl_call);
} ssl_calls SEC(".maps");

struct ssl_key {
	__u64 ssl;
	__u32 tgid;
	__u32 _pad;
};

/* The socket an SSL object was last seen on, with the socket's cookie
 * then (so that a freed and reused socket is not taken for it). */
struct ssl_sock {
	__u64 sk;
	__u64 cookie;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ssl_key);
	__type(value, struct ssl_sock);
} ssl_socks SEC(".maps");

/* Force bpf2go to emit the Go type of the counters. */
const enum ssl_stat *unused_ssl_stat __attribute__((unused));

/* Architecture: the stack pointer after a return, relative to the one at
 * entry (x86 pops the return address; arm64 returns through the link
 * register). */
#if defined(__TARGET_ARCH_x86)
#define RET_SP_DELTA 8
#else
#define RET_SP_DELTA 0
#endif

static __always_inline int on_entry(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) == self_tgid)
		return 0;
	__u64 cookie = bpf_get_attach_cookie(ctx);
	__u64 sp = PT_REGS_SP(ctx);
	struct ssl_call *prev = bpf_map_lookup_elem(&ssl_calls, &id);
	if (prev && sp < prev->sp) {
		/* Called from within an SSL call of this thread. */
		ssl_count(SSL_STAT_NESTED);
		return 0;
	}
	struct ssl_call c = {
		.ssl = PT_REGS_PARM1(ctx),
		.buf = PT_REGS_PARM2(ctx),
		.nbytes = (cookie & COOKIE_EX) ? PT_REGS_PARM4(ctx) : 0,
		.sp = sp,
		.cookie = cookie,
	};
	bpf_map_update_elem(&ssl_calls, &id, &c, BPF_ANY);
	return 0;
}

/* bio_sock returns the socket behind a descriptor BIO, or NULL. */
static __always_inline struct sock *bio_sock(__u64 bio, __u64 cookie)
{
	if (!bio)
		return NULL;
	__u64 method = 0;
	if (bpf_probe_read_user(&method, sizeof(method), (void *)(bio + COOKIE_BIO_METHOD_OFF(cookie))) || !method)
		return NULL;
	int type = 0;
	if (bpf_probe_read_user(&type, sizeof(type), (void *)method) || !(type & BIO_TYPE_DESCRIPTOR))
		return NULL;
	int fd = -1;
	if (bpf_probe_read_user(&fd, sizeof(fd), (void *)(bio + COOKIE_BIO_NUM_OFF(cookie))))
		return NULL;
	return fd_sock(fd);
}

static __always_inline int on_return(struct pt_regs *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *cp = bpf_map_lookup_elem(&ssl_calls, &id);
	if (!cp)
		return 0;
	__u64 sp = PT_REGS_SP(ctx);
	if (sp < cp->sp + RET_SP_DELTA)
		return 0; /* a nested call's return: the outer one reports */
	struct ssl_call c = *cp;
	bpf_map_delete_elem(&ssl_calls, &id);
	if (sp != c.sp + RET_SP_DELTA)
		return 0; /* the return of a call whose entry was not seen */

	long ret = PT_REGS_RC(ctx);
	__u64 n = 0;
	if (c.nbytes) {
		if ((int)ret != 1 || bpf_probe_read_user(&n, sizeof(n), (void *)c.nbytes))
			return 0;
	} else {
		if ((int)ret <= 0)
			return 0;
		n = (__u32)(int)ret;
	}
	if (!n)
		return 0;
	if (n > 0xffffffff)
		n = 0xffffffff;
	ssl_count(SSL_STAT_CALLS);

	__u8 dir = (c.cookie & COOKIE_SEND) ? DIR_SEND : DIR_RECV;
	__u16 version = 0;
	struct sock *sk = NULL;
	if (c.cookie & COOKIE_LAYOUT) {
		int v = 0;
		bpf_probe_read_user(&v, sizeof(v), (void *)(c.ssl + COOKIE_VERSION_OFF(c.cookie)));
		/* SSL 3.0 .. TLS 1.3, or DTLS: else the layout is not this one. */
		if ((v >= 0x0300 && v <= 0x0304) || (v >= 0xfefc && v <= 0xfeff) || v == 0x0100) {
			if (v == 0x0303 || v == 0x0304)
				version = v;
			__u64 bio = 0;
			__u64 off = COOKIE_RBIO_OFF(c.cookie) + (dir == DIR_SEND ? 8 : 0);
			if (!bpf_probe_read_user(&bio, sizeof(bio), (void *)(c.ssl + off))) {
				sk = bio_sock(bio, c.cookie);
				if (sk)
					ssl_count(SSL_STAT_BY_FD);
			}
		} else {
			ssl_count(SSL_STAT_BAD_LAYOUT);
		}
	}
	if (!sk && c.sk) {
		sk = (struct sock *)c.sk;
		ssl_count(SSL_STAT_BY_IO);
	}
	struct ssl_key key = {.ssl = c.ssl, .tgid = id >> 32};
	if (sk) {
		struct ssl_sock s = {.sk = (__u64)sk, .cookie = tls_sock_cookie(sk)};
		struct ssl_sock *old = bpf_map_lookup_elem(&ssl_socks, &key);
		if (!old || old->sk != s.sk || old->cookie != s.cookie)
			bpf_map_update_elem(&ssl_socks, &key, &s, BPF_ANY);
	} else {
		struct ssl_sock *s = bpf_map_lookup_elem(&ssl_socks, &key);
		if (s && tls_sock_cookie((struct sock *)s->sk) == s->cookie) {
			sk = (struct sock *)s->sk;
			ssl_count(SSL_STAT_BY_CACHE);
		}
	}
	if (!sk) {
		ssl_count(SSL_STAT_UNBOUND);
		return 0;
	}
	emit_plain(sk, dir, SOURCE_OPENSSL, (const void *)c.buf, (__u32)n, version);
	return 0;
}

/* Each entry and return program exists twice: for a uprobe_multi link
 * (Linux 6.6+: one link, and one RCU grace period to attach or detach, for
 * all the functions of a file) and for classic uprobes. */
SEC("uprobe.multi")
int ssl_entry_multi(struct pt_regs *ctx)
{
	return on_entry(ctx);
}

SEC("uretprobe.multi")
int ssl_return_multi(struct pt_regs *ctx)
{
	return on_return(ctx);
}

SEC("uprobe")
int ssl_entry(struct pt_regs *ctx)
{
	return on_entry(ctx);
}

SEC("uretprobe")
int ssl_return(struct pt_regs *ctx)
{
	return on_return(ctx);
}

/* The socket a thread inside an SSL call does I/O on (see above). */
static __always_inline void note_io(struct sock *sk)
{
	if (!sk || !sock_traceable(sk))
		return;
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *c = bpf_map_lookup_elem(&ssl_calls, &id);
	if (c && !c->sk)
		c->sk = (__u64)sk;
}

/* Linux 6.3+: every sock_sendmsg / sock_recvmsg, with the socket. */
SEC("tp_btf/sock_send_length")
int BPF_PROG(ssl_sock_send, struct sock *sk, int ret, int flags)
{
	note_io(sk);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(ssl_sock_recv, struct sock *sk, int ret, int flags)
{
	note_io(sk);
	return 0;
}

/* Before 6.3: the descriptor of the thread's read and write system calls
 * (the trace events of their entries), resolved to its socket only for
 * threads inside an SSL call. */
static __always_inline void note_fd(struct syscall_trace_enter *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ssl_call *c = bpf_map_lookup_elem(&ssl_calls, &id);
	if (!c || c->sk)
		return;
	long fd = -1;
	bpf_probe_read_kernel(&fd, sizeof(fd), &ctx->args[0]);
	struct sock *sk = fd_sock((int)fd);
	if (sk)
		c->sk = (__u64)sk;
}

#define SSL_SYS_IO(call)                                                                                              \
	SEC("tracepoint/syscalls/sys_enter_" #call)                                                                    \
	int sslio_##call(struct syscall_trace_enter *ctx)                                                              \
	{                                                                                                              \
		note_fd(ctx);                                                                                          \
		return 0;                                                                                              \
	}

SSL_SYS_IO(read)
SSL_SYS_IO(write)
SSL_SYS_IO(readv)
SSL_SYS_IO(writev)
SSL_SYS_IO(recvfrom)
SSL_SYS_IO(sendto)
SSL_SYS_IO(recvmsg)
SSL_SYS_IO(sendmsg)
