// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * fentry attach mode: the kprobe mode's hooks as fentry/fexit programs
 * (BPF trampolines), which cost less than kprobes and get typed pointers,
 * so kernel fields are plain loads:
 *   fexit  tcp_v4_connect, tcp_v6_connect   the task connected
 *   fexit  inet_csk_accept                  the task accepted (its result)
 *   fentry tcp_close                        connection closed
 *   fexit  tcp_sendmsg, tcp_recvmsg         bytes sent / received
 *   fexit  tls_sw_sendmsg, tls_device_sendmsg, tls_sw_recvmsg
 *                                           plaintext sent / received on
 *                                           a socket with kernel TLS
 * An fexit program sees the arguments and the result together, so no
 * state is kept between entry and return.
 *
 * The tls_* functions are the tls module's: their programs are loaded
 * (against the module's BTF) and attached by user space once the module
 * is loaded (see probes/ktls.go). Kernel TLS never calls tcp_sendmsg or
 * tcp_recvmsg for a direction with a key.
 */
#define CLOVISOR_BTF_PTRS
#define CLOVISOR_KTLS_HOOKS
#include "socket.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Which argument of tcp_recvmsg holds the flags (see socket_kprobe.c). */
volatile const __u8 recvmsg_flags_arg = 3;

static __always_inline void emit_open(struct sock *sk, __u8 role)
{
	__u64 cgid;
	if (!sk || !sock_traceable(sk) || !conn_traced(sk, &cgid))
		return;
	struct pending_conn pc = {};
	fill_task(&pc.tgid, &pc.pid, pc.comm);
	emit_conn_event(sk, SOCK_COOKIE(sk), cgid, EVENT_CONN_OPEN, role,
			role == ROLE_CLIENT ? TCP_SYN_SENT : TCP_SYN_RECV, &pc);
}

static __always_inline long result(void *ctx)
{
	__u64 ret = 0;
	bpf_get_func_ret(ctx, &ret);
	return (long)ret;
}

SEC("fexit/tcp_v4_connect")
int BPF_PROG(fx_tcp_v4_connect, struct sock *sk)
{
	if ((int)result(ctx) == 0)
		emit_open(sk, ROLE_CLIENT);
	return 0;
}

SEC("fexit/tcp_v6_connect")
int BPF_PROG(fx_tcp_v6_connect, struct sock *sk)
{
	if ((int)result(ctx) == 0)
		emit_open(sk, ROLE_CLIENT);
	return 0;
}

/*
 * inet_csk_accept returns the accepted socket; its arguments changed in
 * Linux 6.10 (sk, flags, err, kern -> sk, arg), and an fexit program must
 * match them to reach the result with its type. User space loads the
 * variant the kernel's BTF calls for.
 */
SEC("fexit/inet_csk_accept")
int BPF_PROG(fx_inet_csk_accept4, struct sock *sk, int flags, int *err, bool kern, struct sock *ret)
{
	emit_open(ret, ROLE_SERVER);
	return 0;
}

SEC("fexit/inet_csk_accept")
int BPF_PROG(fx_inet_csk_accept2, struct sock *sk, void *arg, struct sock *ret)
{
	emit_open(ret, ROLE_SERVER);
	return 0;
}

SEC("fentry/tcp_close")
int BPF_PROG(fe_tcp_close, struct sock *sk)
{
	__u64 cgid;
	if (!sock_traceable(sk) || sk->__sk_common.skc_state == TCP_LISTEN || !conn_traced(sk, &cgid))
		return 0;
	emit_conn_event(sk, SOCK_COOKIE(sk), cgid, EVENT_CONN_CLOSE, ROLE_UNKNOWN, sk->__sk_common.skc_state, NULL);
	return 0;
}

SEC("fexit/tcp_sendmsg")
int BPF_PROG(fx_tcp_sendmsg, struct sock *sk)
{
	int ret = (int)result(ctx);
	if (ret > 0 && sock_traceable(sk))
		emit_data(sk, ret, DIR_SEND);
	return 0;
}

SEC("fexit/tcp_recvmsg")
int BPF_PROG(fx_tcp_recvmsg, struct sock *sk)
{
	int ret = (int)result(ctx);
	if (ret <= 0 || !sock_traceable(sk))
		return 0;
	__u64 flags = 0;
	bpf_get_func_arg(ctx, recvmsg_flags_arg, &flags);
	if (!(flags & MSG_PEEK))
		emit_data(sk, ret, DIR_RECV);
	return 0;
}

/* Kernel TLS: the TLS layer's sendmsg (software, or a NIC's offload) and
 * recvmsg, with the plaintext byte count as result. */
static __always_inline void tls_sent(void *ctx, struct sock *sk)
{
	int ret = (int)result(ctx);
	if (ret > 0 && sock_traceable(sk))
		emit_ktls(sk, ret, DIR_SEND);
}

SEC("fexit/tls_sw_sendmsg")
int BPF_PROG(fx_tls_sw_sendmsg, struct sock *sk)
{
	tls_sent(ctx, sk);
	return 0;
}

SEC("fexit/tls_device_sendmsg")
int BPF_PROG(fx_tls_device_sendmsg, struct sock *sk)
{
	tls_sent(ctx, sk);
	return 0;
}

SEC("fexit/tls_sw_recvmsg")
int BPF_PROG(fx_tls_sw_recvmsg, struct sock *sk)
{
	int ret = (int)result(ctx);
	if (ret <= 0 || !sock_traceable(sk))
		return 0;
	__u64 flags = 0;
	bpf_get_func_arg(ctx, recvmsg_flags_arg, &flags);
	if (!(flags & MSG_PEEK))
		emit_ktls(sk, ret, DIR_RECV);
	return 0;
}
