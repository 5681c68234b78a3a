// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * kprobe attach mode, for kernels with kprobes (most production kernels):
 *   tcp_v4_connect, tcp_v6_connect  (entry + return)  the task connected
 *   inet_csk_accept                 (return)          the task accepted
 *   tcp_close                       (entry)           connection closed
 *   tcp_sendmsg                     (entry + return)  bytes sent
 *   tcp_recvmsg                     (entry + return)  a receive call ...
 *   skb_copy_datagram_iter          (entry + return)  ... and each segment
 *                                                     it copied to the user
 *   tls_sw_sendmsg, tls_device_sendmsg (entry + return)  plaintext sent and
 *   tls_sw_recvmsg                  (entry + return)  received on a socket
 *                                                     with kernel TLS
 * Receives are reported per segment copied (skb_copy_datagram_iter within
 * a task's tcp_recvmsg), each with its stream position from the segment
 * (TCP_SKB_CB(skb)->seq + offset) and its payload from where it landed in
 * the syscall's buffer. Kernel memory is read with bpf_probe_read_kernel
 * (CO-RE).
 *
 * The tls_* functions are the tls module's: user space attaches them when
 * the module is loaded (see probes/ktls.go). Kernel TLS never calls
 * tcp_sendmsg or tcp_recvmsg for a direction with a key, so those hooks
 * see only the socket's own bytes; skb_copy_datagram_iter, which also
 * copies decrypted records to the user within tls_sw_recvmsg, reports
 * only within tcp_recvmsg (the inflight map), never for kernel TLS.
 */
#define CLOVISOR_KTLS_HOOKS
#include "socket.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Which argument of tcp_recvmsg holds the flags: 3 since Linux 5.19, 4
 * before (a nonblock argument came first). Set at load from kernel BTF. */
volatile const __u8 recvmsg_flags_arg = 3;

struct call {
	__u64 sk; /* struct sock * */
	__u32 peek;
	/* receives: the segment being copied, and the stream position of the
	 * call's first byte (the offset of a segment in the user's buffer). */
	__u32 seg_seq;
	__u32 seg_len;
	__u32 first_seq;
	__u8 started;
	__u8 _pad[3];
};

/* Calls in flight, from entry to return, by task. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct call);
} inflight SEC(".maps");

/* Kernel TLS calls in flight (tls_sw_sendmsg, tls_device_sendmsg,
 * tls_sw_recvmsg), by task: apart from inflight, so that the segment
 * copies within tls_sw_recvmsg report nothing. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct call);
} tls_inflight SEC(".maps");

static __always_inline void enter_in(void *calls, struct sock *sk, __u32 peek)
{
	if (!sock_traceable(sk))
		return;
	__u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) == self_tgid)
		return;
	struct call c = {.sk = (__u64)sk, .peek = peek};
	bpf_map_update_elem(calls, &id, &c, BPF_ANY);
}

static __always_inline int leave_from(void *calls, struct call *out)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(calls, &id);
	if (!c)
		return 0;
	*out = *c;
	bpf_map_delete_elem(calls, &id);
	return 1;
}

static __always_inline void enter(struct sock *sk, __u32 peek)
{
	enter_in(&inflight, sk, peek);
}

static __always_inline int leave(struct call *out)
{
	return leave_from(&inflight, out);
}

/* emit_open reports a connection opened by the current task. */
static __always_inline void emit_open(struct sock *sk, __u8 role)
{
	__u64 cgid;
	if (!sock_traceable(sk) || !conn_traced(sk, &cgid))
		return;
	struct pending_conn pc = {};
	fill_task(&pc.tgid, &pc.pid, pc.comm);
	emit_conn_event(sk, SOCK_COOKIE(sk), cgid, EVENT_CONN_OPEN, role,
			role == ROLE_CLIENT ? TCP_SYN_SENT : TCP_SYN_RECV, &pc);
}

SEC("kprobe/tcp_v4_connect")
int BPF_KPROBE(kp_tcp_v4_connect, struct sock *sk)
{
	enter(sk, 0);
	return 0;
}

SEC("kretprobe/tcp_v4_connect")
int BPF_KRETPROBE(krp_tcp_v4_connect, int ret)
{
	struct call c;
	if (leave(&c) && ret == 0)
		emit_open((struct sock *)c.sk, ROLE_CLIENT);
	return 0;
}

SEC("kprobe/tcp_v6_connect")
int BPF_KPROBE(kp_tcp_v6_connect, struct sock *sk)
{
	enter(sk, 0);
	return 0;
}

SEC("kretprobe/tcp_v6_connect")
int BPF_KRETPROBE(krp_tcp_v6_connect, int ret)
{
	struct call c;
	if (leave(&c) && ret == 0)
		emit_open((struct sock *)c.sk, ROLE_CLIENT);
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(krp_inet_csk_accept, struct sock *sk)
{
	if (sk)
		emit_open(sk, ROLE_SERVER);
	return 0;
}

SEC("kprobe/tcp_close")
int BPF_KPROBE(kp_tcp_close, struct sock *sk)
{
	__u64 cgid;
	if (!sock_traceable(sk) || BPF_CORE_READ(sk, __sk_common.skc_state) == TCP_LISTEN || !conn_traced(sk, &cgid))
		return 0;
	emit_conn_event(sk, SOCK_COOKIE(sk), cgid, EVENT_CONN_CLOSE, ROLE_UNKNOWN,
			BPF_CORE_READ(sk, __sk_common.skc_state), NULL);
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int BPF_KPROBE(kp_tcp_sendmsg, struct sock *sk)
{
	enter(sk, 0);
	return 0;
}

SEC("kretprobe/tcp_sendmsg")
int BPF_KRETPROBE(krp_tcp_sendmsg, int ret)
{
	struct call c;
	if (leave(&c) && ret > 0)
		emit_data((struct sock *)c.sk, ret, DIR_SEND);
	return 0;
}

/* recv_flags returns the flags argument of tcp_recvmsg or tls_sw_recvmsg
 * (both lost their nonblock argument in the same Linux 5.19 change). */
static __always_inline int recv_flags(struct pt_regs *ctx)
{
	/* Both loads, then the choice: the verifier forbids a context access
	 * at a computed offset, which clang would otherwise make of this. */
	unsigned long p4 = PT_REGS_PARM4(ctx), p5 = PT_REGS_PARM5(ctx);
	asm volatile("" : "+r"(p4), "+r"(p5));
	return recvmsg_flags_arg == 3 ? (int)p4 : (int)p5;
}

SEC("kprobe/tcp_recvmsg")
int BPF_KPROBE(kp_tcp_recvmsg, struct sock *sk)
{
	enter(sk, recv_flags(ctx) & MSG_PEEK);
	return 0;
}

SEC("kretprobe/tcp_recvmsg")
int BPF_KRETPROBE(krp_tcp_recvmsg)
{
	struct call c;
	leave(&c);
	return 0;
}

SEC("kprobe/skb_copy_datagram_iter")
int BPF_KPROBE(kp_skb_copy_datagram_iter, const struct sk_buff *skb, int offset, void *to, int len)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&inflight, &id);
	if (!c || c->peek || len <= 0)
		return 0; /* not a traced task's tcp_recvmsg */
	/* TCP_SKB_CB(skb)->seq: the first field of the control block. */
	__u32 seq;
	char cb[4];
	BPF_CORE_READ_INTO(&cb, skb, cb);
	__builtin_memcpy(&seq, cb, sizeof(seq));
	c->seg_seq = seq + offset;
	c->seg_len = len;
	if (!c->started) {
		c->first_seq = c->seg_seq;
		c->started = 1;
	}
	return 0;
}

SEC("kretprobe/skb_copy_datagram_iter")
int BPF_KRETPROBE(krp_skb_copy_datagram_iter, int ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct call *c = bpf_map_lookup_elem(&inflight, &id);
	if (!c || c->peek || !c->seg_len)
		return 0;
	__u32 len = c->seg_len;
	c->seg_len = 0;
	if (ret == 0)
		emit_data_at((struct sock *)c->sk, len, DIR_RECV, 1, c->seg_seq, c->seg_seq - c->first_seq);
	return 0;
}

/* Kernel TLS: the TLS layer's sendmsg (software, or a NIC's offload: one
 * program on both) and recvmsg, with the plaintext byte count as result. */
SEC("kprobe/tls_sw_sendmsg")
int BPF_KPROBE(kp_tls_sendmsg, struct sock *sk)
{
	enter_in(&tls_inflight, sk, 0);
	return 0;
}

SEC("kretprobe/tls_sw_sendmsg")
int BPF_KRETPROBE(krp_tls_sendmsg, int ret)
{
	struct call c;
	if (leave_from(&tls_inflight, &c) && ret > 0)
		emit_ktls((struct sock *)c.sk, ret, DIR_SEND);
	return 0;
}

SEC("kprobe/tls_sw_recvmsg")
int BPF_KPROBE(kp_tls_recvmsg, struct sock *sk)
{
	enter_in(&tls_inflight, sk, recv_flags(ctx) & MSG_PEEK);
	return 0;
}

SEC("kretprobe/tls_sw_recvmsg")
int BPF_KRETPROBE(krp_tls_recvmsg, int ret)
{
	struct call c;
	if (leave_from(&tls_inflight, &c) && !c.peek && ret > 0)
		emit_ktls((struct sock *)c.sk, ret, DIR_RECV);
	return 0;
}
