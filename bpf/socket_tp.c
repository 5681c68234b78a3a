// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Tracepoint attach mode: BTF tracepoints only, which is what kernels
 * without kprobes or fentry still allow.
 *   inet_sock_set_state          connection opened (with role) / closed
 *   sock_send_length (6.3+)      every sock_sendmsg, with the socket and
 *   sock_recv_length (6.3+)      every sock_recvmsg, its result
 * The payload comes from the syscall's own buffers (see copy_payload).
 */
#define CLOVISOR_BTF_PTRS
#include "socket.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tp_inet_sock_set_state, struct sock *sk, int oldstate, int newstate)
{
	if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE)
		return 0;
	emit_conn(sk, oldstate, newstate);
	return 0;
}

SEC("tp_btf/sock_send_length")
int BPF_PROG(tp_sock_send_length, struct sock *sk, int ret, int flags)
{
	if (ret <= 0 || !sock_traceable(sk))
		return 0;
	emit_data(sk, ret, DIR_SEND);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(tp_sock_recv_length, struct sock *sk, int ret, int flags)
{
	if (ret <= 0 || (flags & MSG_PEEK) || !sock_traceable(sk))
		return 0;
	emit_data(sk, ret, DIR_RECV);
	return 0;
}
