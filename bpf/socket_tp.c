// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Tracepoint attach mode: BTF tracepoints only, which is what kernels
 * without kprobes or fentry still allow.
 *   inet_sock_set_state          connection opened (with role) / closed
 *   syscalls/sys_exit_accept(4)  the task that accepted an incoming one
 *   sock_send_length (6.3+)      every sock_sendmsg, with the socket and
 *   sock_recv_length (6.3+)      every sock_recvmsg, its result
 * The payload comes from the syscall's own buffers (see copy_payload).
 */
#define CLOVISOR_BTF_PTRS
#include "socket.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* A read-only typed view of a kernel pointer (Linux 6.2+). */
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym;

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(tp_inet_sock_set_state, struct sock *sk, int oldstate, int newstate)
{
	if (newstate != TCP_ESTABLISHED && newstate != TCP_CLOSE && newstate != TCP_SYN_SENT)
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

/*
 * accept() and accept4() return the new socket's descriptor: from it, the
 * socket and its cookie (made by bpf_get_socket_cookie when the connection
 * was established above, so the kernel has it stored).
 */
static __always_inline void accepted(long fd)
{
	if (fd < 0)
		return;
	struct task_struct *task = bpf_get_current_task_btf();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	struct file *f;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return;
	struct socket *sock = BPF_CORE_READ(f, private_data);
	struct sock *raw = BPF_CORE_READ(sock, sk);
	if (!raw)
		return;
	struct sock *sk = bpf_rdonly_cast(raw, bpf_core_type_id_kernel(struct sock));
	__u64 cookie = sk->__sk_common.skc_cookie.counter;
	if (cookie)
		emit_accept(sk, cookie);
}

SEC("tracepoint/syscalls/sys_exit_accept4")
int tp_sys_exit_accept4(struct syscall_trace_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_accept")
int tp_sys_exit_accept(struct syscall_trace_exit *ctx)
{
	accepted(ctx->ret);
	return 0;
}
