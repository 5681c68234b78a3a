// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Tracepoint attach mode for kernels before 6.3, which lack the
 * sock_send_length / sock_recv_length tracepoints (socket_tp.c):
 *   inet_sock_set_state (BTF)    connection opened / closed, and the
 *                                socket's cookie made (bpf_get_socket_cookie)
 *   syscalls/sys_exit_accept(4)  the task that accepted
 *   syscalls/sys_exit_{read,write,readv,writev,sendto,recvfrom,sendmsg,
 *   recvmsg}                     bytes moved on a socket descriptor
 * The syscall events are classic tracepoints: the descriptor is resolved
 * to its socket through the task's file table (CO-RE reads), and the
 * socket's cookie is read from the socket, where the state-change program
 * stored it. Sockets opened before the agent started have no cookie and
 * are not traced in this mode.
 */
#define SOCK_COOKIE(sk) BPF_CORE_READ(sk, __sk_common.skc_cookie.counter)
#include "socket.h"
#include "fdsock.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tps_inet_sock_set_state, struct sock *sk, int oldstate, int newstate)
{
	if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE && newstate != TCP_SYN_SENT)
		return 0;
	/* Makes the cookie (kept in the socket) the syscall programs read. */
	bpf_get_socket_cookie(sk);
	emit_conn(sk, oldstate, newstate);
	return 0;
}

static __always_inline void accepted(long fd)
{
	struct sock *sk = fd_sock(fd);
	if (!sk)
		return;
	__u64 cookie = SOCK_COOKIE(sk);
	if (cookie)
		emit_accept(sk, cookie);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int tps_sys_exit_accept4(struct syscall_trace_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int tps_sys_exit_accept(struct syscall_trace_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}

/* io reports a read or write syscall's bytes when its descriptor is a TCP
 * socket. The descriptor (first argument) and, in copy_payload, the
 * buffers come from the task's saved registers. peek_flags_arg is the
 * argument holding recv flags (0: none). */
static __always_inline void io(struct syscall_trace_exit *ctx, __u8 dir, int peek_flags_arg)
{
	long ret = ctx->ret;
	if (ret <= 0)
		return;
	/* These events fire for every read and write on the system: drop
	 * untraced tasks before looking at the descriptor. */
	__u64 cgid = bpf_get_current_cgroup_id();
	if ((bpf_get_current_pid_tgid() >> 32) == self_tgid ||
	    (filter_cgroups && !bpf_map_lookup_elem(&traced_cgroups, &cgid)))
		return;
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (peek_flags_arg) {
		__u64 flags = peek_flags_arg == 3 ? SYSCALL_ARG3(regs) : SYSCALL_ARG4(regs);
		if (flags & MSG_PEEK)
			return;
	}
	struct sock *sk = fd_sock(SYSCALL_ARG1(regs));
	if (sk)
		emit_data(sk, ret, dir);
}

#define IO_EXIT(name, dir, peek)                                      \
	SEC("tracepoint/syscalls/sys_exit_" #name)                    \
	int tps_sys_exit_##name(struct syscall_trace_exit *ctx)       \
	{                                                             \
		io(ctx, dir, peek);                                   \
		return 0;                                             \
	}

IO_EXIT(write, DIR_SEND, 0)
IO_EXIT(writev, DIR_SEND, 0)
IO_EXIT(sendto, DIR_SEND, 0)
IO_EXIT(sendmsg, DIR_SEND, 0)
IO_EXIT(read, DIR_RECV, 0)
IO_EXIT(readv, DIR_RECV, 0)
IO_EXIT(recvfrom, DIR_RECV, 4)
IO_EXIT(recvmsg, DIR_RECV, 3)
