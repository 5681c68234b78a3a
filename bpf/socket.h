/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket tracing: the part shared by every attach mode (tracepoint, kprobe,
 * fentry). The modes differ only in where they hook; each hook calls
 * emit_conn() or emit_data() below, so every mode produces the same events.
 *
 * Kernel -> user space contract (bpf2go generates the Go types):
 *   struct conn_event  connection established (with role) or closed
 *   struct data_event  one send or receive: true byte count, stream offset,
 *                      and a bounded prefix of the payload
 */
#ifndef CLOVISOR_SOCKET_H
#define CLOVISOR_SOCKET_H

#include "vmlinux.h"

#if defined(__TARGET_ARCH_arm64)
/* vmlinux.h comes from an x86 kernel, and CO-RE relocates the kernel's
 * structs for the running kernel; only the register layouts are
 * arch-specific. arm64's, under names CO-RE matches to "pt_regs" and the
 * UAPI kprobe context: */
struct user_pt_regs {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
};
struct pt_regs___arm64_task {
	__u64 regs[31];
	__u64 sp;
	__u64 pc;
	__u64 pstate;
	__u64 orig_x0;
	__s32 syscallno;
} __attribute__((preserve_access_index));
#endif

#include "bpf_helpers.h"
#include "bpf_core_read.h"
#include "bpf_tracing.h"
#include "bpf_endian.h"

#define AF_INET 2
#define AF_INET6 10
#define MSG_PEEK 2

/* Largest payload prefix a data event can carry; the configured prefix
 * (payload_cap) is at most this. */
#define MAX_PAYLOAD 8192
/* How many iovec elements of a vectored call are copied from. */
#define MAX_IOV 8
/* Masks a length to the scratch buffer (data + spill, 2 * MAX_PAYLOAD). */
#define SCRATCH_MASK (2 * MAX_PAYLOAD - 1)

enum event_kind {
	EVENT_CONN_OPEN = 1,
	EVENT_CONN_CLOSE = 2,
	EVENT_DATA = 3,
};

enum conn_role {
	ROLE_UNKNOWN = 0,
	ROLE_CLIENT = 1, /* the socket connected (active open) */
	ROLE_SERVER = 2, /* the socket was accepted (passive open) */
};

enum data_dir {
	DIR_SEND = 1,
	DIR_RECV = 2,
};

/* Flags of conn_event and data_event. */
enum event_flags {
	/* conn_event: send_seq is set. */
	FLAG_SEND_SEQ = 1,
	/* data_event: sent_seq is set. */
	FLAG_SENT_SEQ = 2,
};

/* Where a data event's payload comes from. Only SOURCE_SOCKET events carry
 * TCP sequence numbers; the others are plaintext whose stream position
 * user space counts itself. */
enum payload_source {
	SOURCE_SOCKET = 0,  /* the socket call's own buffers (plaintext, or TLS records) */
	SOURCE_OPENSSL = 1, /* SSL_read/SSL_write of OpenSSL or BoringSSL */
	SOURCE_GO_TLS = 2,  /* crypto/tls (*Conn).Read/Write of a Go program */
	SOURCE_KTLS = 3,    /* a socket with kernel TLS: plaintext before encryption / after decryption */
};

/* Index into the stats map: counters user space reads and exports. */
enum stat_index {
	STAT_DATA_LOST = 0,    /* data events the ring buffer had no room for */
	STAT_CONN_LOST = 1,    /* connection events the ring buffer had no room for */
	STAT_PAYLOAD_FAULT = 2,/* payload copies that faulted (event sent without payload) */
	STAT_CIPHER_SKIPPED = 3,/* socket calls not reported: TLS records of a socket whose plaintext a TLS library gives */
	STAT_MAX = 8,
};

struct conn_tuple {
	__u8 saddr[16]; /* local address: IPv4 in the first 4 bytes, or IPv6 */
	__u8 daddr[16]; /* remote address */
	__u16 sport;    /* local port, host byte order */
	__u16 dport;    /* remote port, host byte order */
	__u16 family;   /* AF_INET or AF_INET6 */
	__u16 _pad;
};

struct conn_event {
	__u8 kind; /* EVENT_CONN_OPEN or EVENT_CONN_CLOSE */
	__u8 role; /* enum conn_role (open events) */
	__u8 old_state;
	__u8 flags; /* FLAG_SEND_SEQ */
	/* Open events: the sequence number of the first byte the socket will
	 * send (tp->write_seq when it opened, past the SYN). */
	__u32 send_seq;
	__u64 ts;        /* bpf_ktime_get_ns(): open: when the connection was established */
	__u64 cookie;    /* socket cookie */
	__u64 cgroup_id; /* cgroup v2 id of the socket's owner */
	/* The process that connected or accepted (open events; 0 when not
	 * known: close events, or accepts the mode cannot see). */
	__u32 tgid;
	__u32 pid;
	__u8 comm[16];
	struct conn_tuple tuple;
	/* close events: the TCP connection's own counters */
	__u64 bytes_sent;
	__u64 bytes_received;
	__u32 srtt_us;
	__u32 total_retrans;
};

struct data_event {
	__u8 kind;   /* EVENT_DATA */
	__u8 dir;    /* enum data_dir */
	__u8 source; /* enum payload_source */
	__u8 flags;  /* FLAG_SENT_SEQ */
	__u32 seq;       /* TCP sequence number of the first byte (wraps); SOURCE_SOCKET only */
	__u64 ts;        /* bpf_ktime_get_ns() when the call returned */
	__u64 cookie;    /* socket cookie */
	__u64 cgroup_id; /* cgroup v2 id of the calling task */
	__u32 tgid;
	__u32 pid;
	__u32 len; /* true byte count of the call */
	__u32 cap; /* bytes of payload that follow (<= len, <= payload_cap) */
	/* TLS protocol version as on the wire (0x0303 TLS 1.2, 0x0304 TLS 1.3)
	 * when the source knows it, else 0. */
	__u16 tls_version;
	__u16 _pad1;
	/* DIR_RECV, SOURCE_SOCKET: the end of the socket's send stream
	 * (tp->write_seq) when the bytes were read. A thread's send returns,
	 * and its event is written, after its bytes left: another thread may
	 * read the reply and write its event first. This tells user space
	 * which sends a receive came after. */
	__u32 sent_seq;
	__u8 comm[16];
	struct conn_tuple tuple;
	__u8 data[MAX_PAYLOAD];
};

/* Scratch space: the payload of a vectored call is copied at a variable
 * offset, so the buffer is twice the largest prefix to keep every copy
 * provably in bounds. */
struct data_scratch {
	struct data_event ev;
	__u8 spill[MAX_PAYLOAD];
};

/* Payload prefix per call: a run-time setting (in .data, not .rodata), which
 * user space may change while the programs run (Tracer.SetPayloadBytes).
 * Read it through payload_prefix, which bounds it to MAX_PAYLOAD. */
volatile __u32 payload_cap = 4096;

/* payload_prefix is how many of len bytes a data event carries: at most
 * payload_cap, and never more than MAX_PAYLOAD whatever payload_cap holds. */
static __always_inline __u32 payload_prefix(__u32 len)
{
	__u32 cap = payload_cap;
	if (cap > MAX_PAYLOAD)
		cap = MAX_PAYLOAD;
	__u32 want = len < cap ? len : cap;
	/* The copies mask want (SCRATCH_MASK) for the verifier: hide the bound
	 * above from the compiler, which would drop those masks as no-ops. */
	barrier_var(want);
	return want;
}

/* Settings fixed at load time by user space. */
volatile const __u32 self_tgid = 0;        /* the agent: never traced */
volatile const __u8 filter_cgroups = 0;    /* trace only traced_cgroups */
volatile const __u8 filter_ports = 0;      /* trace only traced_ports */
/* Waking the reader for every event costs far more than the event (an
 * irq_work and a context switch): events are written without a wakeup,
 * the reader polls, and only a ring filling up past this many bytes wakes
 * it at once. */
volatile const __u64 wakeup_bytes = 1 << 20;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* cgroup v2 ids whose sockets are traced (when filter_cgroups is set). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
} traced_cgroups SEC(".maps");

/* Ports (local or remote, host byte order) whose connections are traced
 * (when filter_ports is set). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u16);
	__type(value, __u8);
} traced_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct data_scratch);
} scratch SEC(".maps");

/*
 * Cookies of sockets whose plaintext a TLS library's probes report (set by
 * emit_plain, tls.h; the TLS objects share the socket mode's map). Their
 * own calls then move only TLS records after the handshake, which user
 * space reads for nothing but the hellos, sent before the library's first
 * plaintext: such calls are counted (STAT_CIPHER_SKIPPED) and not
 * reported, which spares copying every encrypted byte to the ring and
 * decoding it. An entry goes when its connection closes (or, should the
 * close be missed, to the LRU; cookies are never reused). A connection
 * that leaves TLS and goes on in the clear (after a close_notify) is not
 * seen from then on.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} plain_socks SEC(".maps");

/* Force bpf2go to emit the Go types of the events. */
const struct conn_event *unused_conn_event __attribute__((unused));
const struct data_event *unused_data_event __attribute__((unused));
const enum event_kind *unused_event_kind __attribute__((unused));
const enum conn_role *unused_conn_role __attribute__((unused));
const enum data_dir *unused_data_dir __attribute__((unused));
const enum event_flags *unused_event_flags __attribute__((unused));
const enum payload_source *unused_payload_source __attribute__((unused));
const enum stat_index *unused_stat_index __attribute__((unused));

static __always_inline __u64 ringbuf_flags(void)
{
	return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		*v += 1;
}

/* Syscall numbers of the calls whose user buffers we copy from. */
#if defined(__TARGET_ARCH_x86)
#define NR_read 0
#define NR_write 1
#define NR_readv 19
#define NR_writev 20
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define SYSCALL_NR(r) ((r)->orig_ax)
#define SYSCALL_ARG1(r) ((r)->di)
#define SYSCALL_ARG2(r) ((r)->si)
#define SYSCALL_ARG3(r) ((r)->dx)
#define SYSCALL_ARG4(r) ((r)->r10)
#elif defined(__TARGET_ARCH_arm64)
#define NR_read 63
#define NR_write 64
#define NR_readv 65
#define NR_writev 66
#define NR_sendto 206
#define NR_recvfrom 207
#define NR_sendmsg 211
#define NR_recvmsg 212
#define SYSCALL_NR(r) (((struct pt_regs___arm64_task *)(r))->syscallno)
#define SYSCALL_ARG1(r) (((struct pt_regs___arm64_task *)(r))->orig_x0)
#define SYSCALL_ARG2(r) (((struct pt_regs___arm64_task *)(r))->regs[1])
#define SYSCALL_ARG3(r) (((struct pt_regs___arm64_task *)(r))->regs[2])
#define SYSCALL_ARG4(r) (((struct pt_regs___arm64_task *)(r))->regs[3])
#else
#error "unsupported architecture"
#endif

/*
 * Reading kernel memory. Modes whose hooks get BTF-typed pointers
 * (tp_btf, fentry) define CLOVISOR_BTF_PTRS and read fields with plain
 * loads, which the verifier turns into fault-safe loads: no helper call
 * per field. The kprobe mode reads through bpf_probe_read_kernel (CO-RE).
 */
#ifdef CLOVISOR_BTF_PTRS
#define KREAD(src, a) ((src)->a)
#define KREAD_INTO(dst, src, a) __builtin_memcpy((dst), &(src)->a, sizeof(*(dst)))
#define TCP_SK(sk) bpf_skc_to_tcp_sock(sk)
#define SOCK_COOKIE(sk) bpf_get_socket_cookie(sk)
#else
#define KREAD(src, a) BPF_CORE_READ(src, a)
#define KREAD_INTO(dst, src, a) BPF_CORE_READ_INTO(dst, src, a)
#define TCP_SK(sk) ((struct tcp_sock *)(sk))
#ifndef SOCK_COOKIE
/* kprobe programs may not call bpf_get_socket_cookie: the socket's address,
 * scrambled by an odd multiplier (a bijection, so still unique), stands in
 * for it. */
volatile const __u64 cookie_mult = 0x9e3779b97f4a7c15ULL;
#define SOCK_COOKIE(sk) ((__u64)(sk) * cookie_mult)
#endif
#endif

static __always_inline int sock_traceable(const struct sock *sk)
{
	__u16 family = KREAD(sk, __sk_common.skc_family);
	if (family != AF_INET && family != AF_INET6)
		return 0;
	return KREAD(sk, sk_protocol) == IPPROTO_TCP;
}

static __always_inline void read_tuple(const struct sock *sk, struct conn_tuple *t)
{
	t->family = KREAD(sk, __sk_common.skc_family);
	t->sport = KREAD(sk, __sk_common.skc_num);
	t->dport = bpf_ntohs(KREAD(sk, __sk_common.skc_dport));
	if (t->family == AF_INET) {
		KREAD_INTO((__u32 *)t->saddr, sk, __sk_common.skc_rcv_saddr);
		KREAD_INTO((__u32 *)t->daddr, sk, __sk_common.skc_daddr);
	} else {
		KREAD_INTO((__u8(*)[16])t->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		KREAD_INTO((__u8(*)[16])t->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
}

static __always_inline int ports_traced(__u16 sport, __u16 dport)
{
	if (!filter_ports)
		return 1;
	return bpf_map_lookup_elem(&traced_ports, &sport) || bpf_map_lookup_elem(&traced_ports, &dport);
}

static __always_inline __u64 sock_cgroup_id(const struct sock *sk)
{
#ifdef CLOVISOR_BTF_PTRS
	struct cgroup *cg = sk->sk_cgrp_data.cgroup;
	return cg ? cg->kn->id : 0;
#else
	return BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
#endif
}

/* Who opened a connection, kept from the moment the process context is
 * known until the event can be sent: the connecting task (at SYN_SENT)
 * until the handshake completes, or the establishment time of an incoming
 * connection until a task accepts it. */
struct pending_conn {
	__u64 ts;
	__u32 tgid;
	__u32 pid;
	__u8 comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64); /* socket cookie */
	__type(value, struct pending_conn);
} pending_conns SEC(".maps");

/* Set when the mode sees accepts (in process context): incoming
 * connections are then reported when accepted, with the accepting task;
 * otherwise when established, without it. */
volatile const __u8 accept_hook = 0;

static __always_inline void fill_task(__u32 *tgid, __u32 *pid, __u8 *comm)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	*tgid = pid_tgid >> 32;
	*pid = (__u32)pid_tgid;
	bpf_get_current_comm(comm, 16);
}

static __always_inline int conn_traced(const struct sock *sk, __u64 *cgid)
{
	*cgid = sock_cgroup_id(sk);
	if (filter_cgroups && !bpf_map_lookup_elem(&traced_cgroups, cgid))
		return 0;
	__u16 sport = KREAD(sk, __sk_common.skc_num);
	__u16 dport = bpf_ntohs(KREAD(sk, __sk_common.skc_dport));
	return ports_traced(sport, dport);
}

/*
 * emit_conn_event sends an open or close event for sk. For opens, p (if
 * not NULL) names the process and the establishment time.
 */
static __always_inline void emit_conn_event(struct sock *sk, __u64 cookie, __u64 cgid, __u8 kind, __u8 role,
					    __u8 oldstate, const struct pending_conn *p)
{
	if (kind == EVENT_CONN_CLOSE)
		bpf_map_delete_elem(&plain_socks, &cookie);
	struct conn_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(STAT_CONN_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->role = role;
	e->old_state = oldstate;
	e->ts = bpf_ktime_get_ns();
	e->cookie = cookie;
	e->cgroup_id = cgid;
	if (p) {
		if (p->ts)
			e->ts = p->ts;
		e->tgid = p->tgid;
		e->pid = p->pid;
		__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	}
	read_tuple(sk, &e->tuple);
	if (kind == EVENT_CONN_OPEN) {
		/* Through a probe read: sk may be the accept hook's read-only
		 * cast, which bpf_skc_to_tcp_sock does not take. Opens are of
		 * TCP sockets only. */
		if (!BPF_CORE_READ_INTO(&e->send_seq, (struct tcp_sock *)sk, write_seq))
			e->flags = FLAG_SEND_SEQ;
	} else {
		struct tcp_sock *tp = TCP_SK(sk);
		if (tp) {
			e->bytes_sent = KREAD(tp, bytes_sent);
			e->bytes_received = KREAD(tp, bytes_received);
			e->srtt_us = KREAD(tp, srtt_us) >> 3;
			e->total_retrans = KREAD(tp, total_retrans);
		}
	}
	bpf_ringbuf_submit(e, ringbuf_flags());
}

/*
 * emit_conn reports a TCP state change that opens or closes a connection.
 * It runs in any context (softirq included), so the cgroup is the socket's
 * own (the cgroup of the process that created it), not current's.
 */
static __always_inline void emit_conn(struct sock *sk, int oldstate, int newstate)
{
	if (!sock_traceable(sk))
		return;
	__u64 cgid;
	if (!conn_traced(sk, &cgid))
		return;
	__u64 cookie = SOCK_COOKIE(sk);
	struct pending_conn *p;

	switch (newstate) {
	case TCP_SYN_SENT:
		/* connect(): the only moment the connecting task is current. */
		if (oldstate == TCP_CLOSE) {
			struct pending_conn pc = {};
			fill_task(&pc.tgid, &pc.pid, pc.comm);
			bpf_map_update_elem(&pending_conns, &cookie, &pc, BPF_ANY);
		}
		return;
	case TCP_ESTABLISHED:
		if (oldstate == TCP_SYN_SENT) {
			p = bpf_map_lookup_elem(&pending_conns, &cookie);
			emit_conn_event(sk, cookie, cgid, EVENT_CONN_OPEN, ROLE_CLIENT, oldstate, p);
			if (p)
				bpf_map_delete_elem(&pending_conns, &cookie);
		} else if (oldstate == TCP_SYN_RECV) {
			if (accept_hook) {
				/* Reported by the accept hook, with the task. */
				struct pending_conn pc = {.ts = bpf_ktime_get_ns()};
				bpf_map_update_elem(&pending_conns, &cookie, &pc, BPF_ANY);
			} else {
				emit_conn_event(sk, cookie, cgid, EVENT_CONN_OPEN, ROLE_SERVER, oldstate, NULL);
			}
		}
		return;
	case TCP_CLOSE:
		bpf_map_delete_elem(&pending_conns, &cookie);
		/* A listener or a never-opened socket is no connection. */
		if (oldstate == TCP_LISTEN || oldstate == TCP_CLOSE || oldstate == TCP_SYN_SENT ||
		    oldstate == TCP_SYN_RECV)
			return;
		emit_conn_event(sk, cookie, cgid, EVENT_CONN_CLOSE, ROLE_UNKNOWN, oldstate, NULL);
		return;
	}
}

/*
 * emit_accept reports an incoming connection when a task accepts it (in
 * that task's context); cookie is the socket's cookie.
 */
static __always_inline void emit_accept(struct sock *sk, __u64 cookie)
{
	struct pending_conn *p = bpf_map_lookup_elem(&pending_conns, &cookie);
	if (!p)
		return; /* not traced, or established before we started */
	struct pending_conn pc = *p;
	bpf_map_delete_elem(&pending_conns, &cookie);
	fill_task(&pc.tgid, &pc.pid, pc.comm);
	emit_conn_event(sk, cookie, sock_cgroup_id(sk), EVENT_CONN_OPEN, ROLE_SERVER, TCP_SYN_RECV, &pc);
}

/* copy_iov copies up to want bytes from a user iovec array into dst. */
static __always_inline __u32 copy_iov(__u8 *dst, const struct iovec *iovp, __u64 iovcnt, __u32 want)
{
	__u32 off = 0;

#pragma unroll
	for (int i = 0; i < MAX_IOV; i++) {
		struct iovec iov;
		if (i >= iovcnt || off >= want)
			break;
		if (bpf_probe_read_user(&iov, sizeof(iov), &iovp[i]))
			break;
		__u64 n = iov.iov_len;
		if (n > want - off)
			n = want - off;
		if (n > MAX_PAYLOAD)
			n = MAX_PAYLOAD;
		__u32 o = off & (MAX_PAYLOAD - 1);
		if (n && bpf_probe_read_user(dst + o, n, iov.iov_base))
			break;
		off += n;
	}
	return off;
}

/*
 * copy_payload copies the first want bytes the current syscall sent or
 * received from the caller's buffers, found from the syscall's arguments in
 * the task's saved user registers. Calls that reach a socket some other way
 * (sendfile, splice, io_uring, ...) yield no payload: their byte counts
 * still arrive.
 */
static __always_inline __u32 copy_payload(__u8 *dst, __u32 want, __u32 off)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr = SYSCALL_NR(regs);
	__u64 arg2 = SYSCALL_ARG2(regs);

	switch (nr) {
	case NR_read:
	case NR_write:
	case NR_sendto:
	case NR_recvfrom:
		/* want <= MAX_PAYLOAD (payload_prefix): the mask changes nothing
		 * but lets the verifier see the copy stays inside the scratch
		 * buffer (data + spill). */
		want &= SCRATCH_MASK;
		if (bpf_probe_read_user(dst, want, (void *)(arg2 + off)))
			return (__u32)-1;
		return want;
	}
	/* Vectored calls: only from the start of the call's buffers. */
	if (off)
		return 0;
	switch (nr) {
	case NR_readv:
	case NR_writev:
		return copy_iov(dst, (const struct iovec *)arg2, SYSCALL_ARG3(regs), want);
	case NR_sendmsg:
	case NR_recvmsg: {
		struct user_msghdr msg;
		if (bpf_probe_read_user(&msg, sizeof(msg), (void *)arg2))
			return (__u32)-1;
		return copy_iov(dst, msg.msg_iov, msg.msg_iovlen, want);
	}
	}
	return 0;
}

/*
 * emit_data reports one send or receive of len bytes on sk, called in the
 * context of the task that made the call, after the bytes were copied.
 */
static __always_inline void emit_data_at(struct sock *sk, __u32 len, __u8 dir, int have_seq, __u32 seq, __u32 off);

static __always_inline void emit_data(struct sock *sk, __u32 len, __u8 dir)
{
	emit_data_at(sk, len, dir, 0, 0, 0);
}

/*
 * emit_data_at is emit_data for a part of a call's bytes: when have_seq is
 * set, seq is the part's stream position and off its offset in the call's
 * buffers (the kprobe mode reports receives per segment copied).
 */
/*
 * data_begin starts a data event for a call of the current task on sk: it
 * applies the filters (the agent itself, traced cgroups, traced ports) and
 * returns the per-CPU scratch event with everything but seq, len and the
 * payload filled in, or NULL when the call is not traced.
 */
static __always_inline struct data_event *data_begin(struct sock *sk, __u8 dir, __u8 source)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	if (tgid == self_tgid)
		return NULL;

	__u64 cgid = bpf_get_current_cgroup_id();
	if (filter_cgroups && !bpf_map_lookup_elem(&traced_cgroups, &cgid))
		return NULL;

	__u32 zero = 0;
	struct data_scratch *s = bpf_map_lookup_elem(&scratch, &zero);
	if (!s)
		return NULL;
	struct data_event *e = &s->ev;
	read_tuple(sk, &e->tuple);
	if (!ports_traced(e->tuple.sport, e->tuple.dport))
		return NULL;
	e->cookie = SOCK_COOKIE(sk);
	if (!e->cookie)
		return NULL; /* a socket without a cookie yet (see socket_tpsys.c) */
	e->kind = EVENT_DATA;
	e->dir = dir;
	e->source = source;
	e->flags = 0;
	e->tls_version = 0;
	e->seq = 0;
	e->sent_seq = 0;
	e->ts = bpf_ktime_get_ns();
	e->cgroup_id = cgid;
	e->tgid = tgid;
	e->pid = (__u32)pid_tgid;
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	return e;
}

/* data_submit sends e with got bytes of payload ((__u32)-1: the copy
 * faulted; the event goes without payload). */
static __always_inline void data_submit(struct data_event *e, __u32 got)
{
	if (got == (__u32)-1) {
		count(STAT_PAYLOAD_FAULT);
		got = 0;
	}
	if (got > MAX_PAYLOAD)
		got = MAX_PAYLOAD;
	e->cap = got;

	__u64 size = offsetof(struct data_event, data) + got;
	if (size > sizeof(struct data_event))
		size = sizeof(struct data_event);
	if (bpf_ringbuf_output(&events, e, size, ringbuf_flags()))
		count(STAT_DATA_LOST);
}

/*
 * Kernel TLS. A TCP socket with the "tls" ULP (setsockopt(TCP_ULP, "tls"))
 * and a key for a direction (TLS_TX, TLS_RX: the tls_context's tx_conf,
 * rx_conf are then not TLS_BASE) moves plaintext through the socket
 * calls: the TLS layer's own sendmsg/recvmsg (tls_sw_sendmsg,
 * tls_device_sendmsg, tls_sw_recvmsg, replacing tcp_sendmsg and
 * tcp_recvmsg in the socket's proto) encrypt and decrypt, and reach TCP
 * through tcp_sendmsg_locked (do_tcp_sendpages before 6.5) and
 * tcp_read_sock. Data events of such a direction say SOURCE_KTLS, carry the
 * plaintext and its byte count, no sequence number (the TCP stream holds
 * the records, not these bytes) and the context's protocol version.
 *
 * The tracepoint modes see kernel TLS in their usual hooks
 * (sock_send_length/sock_recv_length, the syscall exits) and tell it apart
 * here (ktls_ctx, ktls_on). The kprobe and fentry modes hook the TLS
 * layer's functions (define CLOVISOR_KTLS_HOOKS): their tcp_sendmsg and
 * tcp_recvmsg hooks never see a direction with kernel TLS.
 */
#define SOL_TLS 282
#define TLS_SET_RECORD_TYPE 1
#define TLS_GET_RECORD_TYPE 2
#define TLS_RECORD_TYPE_DATA 23
#define TLS_BASE 0
#define ULP_NAME_TLS 0x00736c74 /* "tls\0", little-endian */

/* ktls_ctx returns the tls_context of a socket with the "tls" ULP, else
 * NULL. On every other socket it costs one load (icsk_ulp_ops is NULL
 * unless a ULP is attached). */
static __always_inline const void *ktls_ctx(struct tcp_sock *tp)
{
	const struct tcp_ulp_ops *ops = KREAD(tp, inet_conn.icsk_ulp_ops);
	if (!ops)
		return NULL;
	__u32 name = 0;
	if (BPF_CORE_READ_INTO(&name, ops, name) || name != ULP_NAME_TLS)
		return NULL; /* another ULP (mptcp, espintcp, smc) */
	return KREAD(tp, inet_conn.icsk_ulp_data);
}

/* ktls_on reports whether direction dir of the tls_context ctx has a key
 * (goes through kernel TLS). */
static __always_inline int ktls_on(const void *ctx, __u8 dir)
{
	if (!bpf_core_type_exists(struct tls_context))
		return 1; /* the kernel's BTF does not describe it: take the ULP's word */
	const struct tls_context *c = ctx;
	__u8 conf = dir == DIR_SEND ? BPF_CORE_READ_BITFIELD_PROBED(c, tx_conf) : BPF_CORE_READ_BITFIELD_PROBED(c, rx_conf);
	return conf != TLS_BASE;
}

/* ktls_version is the tls_context's protocol version (0x0303, 0x0304), 0
 * when unknown. */
static __always_inline __u16 ktls_version(const void *ctx)
{
	if (!ctx || !bpf_core_type_exists(struct tls_context))
		return 0;
	return BPF_CORE_READ((const struct tls_context *)ctx, prot_info.version);
}

/* The first control message of a sendmsg/recvmsg call, as far as a TLS
 * record type goes. */
struct ktls_cmsg {
	__u64 len; /* cmsg_len */
	__s32 level;
	__s32 type;
	__u8 record_type;
};
#define KTLS_CMSG_LEN 17 /* CMSG_LEN(1) */

/*
 * ktls_app_data returns 0 when the current call moved a TLS record other
 * than application data: an alert or a handshake message (a TLS 1.3
 * NewSessionTicket or KeyUpdate, for example), which only sendmsg and
 * recvmsg can move, naming the record type in a SOL_TLS control message
 * (TLS_SET_RECORD_TYPE from the caller; TLS_GET_RECORD_TYPE, which the
 * kernel writes into the caller's buffer before the call returns). Any
 * other call moves application data (the kernel fails a read of another
 * record type with EIO).
 */
static __always_inline int ktls_app_data(void)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	long nr = SYSCALL_NR(regs);
	if (nr != NR_sendmsg && nr != NR_recvmsg)
		return 1;
	struct user_msghdr msg;
	if (bpf_probe_read_user(&msg, sizeof(msg), (void *)SYSCALL_ARG2(regs)))
		return 1;
	if (!msg.msg_control || msg.msg_controllen < KTLS_CMSG_LEN)
		return 1;
	struct ktls_cmsg c;
	if (bpf_probe_read_user(&c, KTLS_CMSG_LEN, msg.msg_control))
		return 1;
	if (c.len < KTLS_CMSG_LEN || c.level != SOL_TLS ||
	    (c.type != TLS_SET_RECORD_TYPE && c.type != TLS_GET_RECORD_TYPE))
		return 1;
	return c.record_type == TLS_RECORD_TYPE_DATA;
}

/* ktls_submit sends e (filled by data_begin) for len bytes of plaintext
 * moved by the current call through kernel TLS (context ctx). */
static __always_inline void ktls_submit(struct data_event *e, const void *ctx, __u32 len)
{
	if (!ktls_app_data())
		return;
	e->source = SOURCE_KTLS;
	e->seq = 0;
	e->len = len;
	e->tls_version = ktls_version(ctx);
	__u32 want = payload_prefix(len);
	data_submit(e, copy_payload(e->data, want, 0));
}

/* emit_ktls reports len bytes of plaintext that the current task's call
 * moved through the TLS layer of sk (its sendmsg/recvmsg hooks, which only
 * run for directions with kernel TLS). */
static __always_inline void emit_ktls(struct sock *sk, __u32 len, __u8 dir)
{
	struct data_event *e = data_begin(sk, dir, SOURCE_KTLS);
	if (!e)
		return;
	struct tcp_sock *tp = TCP_SK(sk);
	if (!tp)
		return;
	ktls_submit(e, ktls_ctx(tp), len);
}

static __always_inline void emit_data_at(struct sock *sk, __u32 len, __u8 dir, int have_seq, __u32 seq, __u32 off)
{
	struct data_event *e = data_begin(sk, dir, SOURCE_SOCKET);
	if (!e)
		return;
	struct tcp_sock *tp = TCP_SK(sk);
	if (!tp)
		return;
	if (!have_seq) {
#ifndef CLOVISOR_KTLS_HOOKS
		const void *ctx = ktls_ctx(tp);
		if (ctx && ktls_on(ctx, dir)) {
			ktls_submit(e, ctx, len);
			return;
		}
#endif
		/* The stream position of the call's first byte: the send
		 * queue's end or the copied-to-user mark, minus what this call
		 * moved. */
		__u32 seq_end = dir == DIR_SEND ? KREAD(tp, write_seq) : KREAD(tp, copied_seq);
		seq = seq_end - len;
	}
	if (bpf_map_lookup_elem(&plain_socks, &e->cookie)) {
		count(STAT_CIPHER_SKIPPED);
		return;
	}
	e->seq = seq;
	e->len = len;
	if (dir == DIR_RECV) {
		e->sent_seq = KREAD(tp, write_seq);
		e->flags = FLAG_SENT_SEQ;
	}
	__u32 want = payload_prefix(len);
	data_submit(e, copy_payload(e->data, want, off));
}

#endif /* CLOVISOR_SOCKET_H */
