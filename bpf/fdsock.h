/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * fd_sock: the TCP socket behind one of the current task's descriptors,
 * through the task's file table (CO-RE reads, any program type). Include
 * after socket.h.
 */
#ifndef CLOVISOR_FDSOCK_H
#define CLOVISOR_FDSOCK_H

#define S_IFMT 00170000
#define S_IFSOCK 0140000

/* fd_sock returns the TCP socket behind the current task's descriptor fd,
 * or NULL. */
static __always_inline struct sock *fd_sock(long fd)
{
	if (fd < 0)
		return NULL;
	struct task_struct *task = bpf_get_current_task_btf();
	struct file **fds = BPF_CORE_READ(task, files, fdt, fd);
	unsigned int max = BPF_CORE_READ(task, files, fdt, max_fds);
	if (fd >= max)
		return NULL;
	struct file *f;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return NULL;
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket *sock = BPF_CORE_READ(f, private_data);
	struct sock *sk = BPF_CORE_READ(sock, sk);
	if (!sk)
		return NULL;
	if (BPF_CORE_READ(sk, __sk_common.skc_family) != AF_INET &&
	    BPF_CORE_READ(sk, __sk_common.skc_family) != AF_INET6)
		return NULL;
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return NULL;
	return sk;
}

#endif /* CLOVISOR_FDSOCK_H */
