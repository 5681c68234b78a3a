/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Plaintext from TLS libraries (uprobes on OpenSSL, Go crypto/tls), sent as
 * data events of the socket underneath, so that they join the socket
 * tracer's connections in user space.
 *
 * The uprobe objects include this header instead of socket.h. They are
 * loaded with the socket tracer's maps (events, stats, traced_cgroups,
 * traced_ports) in place of their own, and must name sockets by the same
 * cookie as the loaded socket mode:
 *   cookie_from_ptr = 0  the kernel's socket cookie (tracepoint and fentry
 *                        modes make it with bpf_get_socket_cookie, which
 *                        stores it in the socket: read back here)
 *   cookie_from_ptr = 1  the kprobe mode's socket address * cookie_mult
 */
#ifndef CLOVISOR_TLS_H
#define CLOVISOR_TLS_H

struct sock;
static inline __attribute__((always_inline)) unsigned long long tls_sock_cookie(const struct sock *sk);
#define SOCK_COOKIE(sk) tls_sock_cookie(sk)

#include "socket.h"
#include "fdsock.h"

volatile const __u8 cookie_from_ptr = 0;
volatile const __u64 cookie_mult = 0x9e3779b97f4a7c15ULL;

static __always_inline unsigned long long tls_sock_cookie(const struct sock *sk)
{
	if (cookie_from_ptr)
		return (__u64)sk * cookie_mult;
	return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

/*
 * emit_plain reports len bytes of plaintext that the current task sent
 * (DIR_SEND) or received (DIR_RECV) through a TLS library on sk, copied
 * from the user buffer buf (already filled: call it at the function's
 * return). tls_version: 0x0303, 0x0304, or 0 when unknown.
 */
static __always_inline void emit_plain(struct sock *sk, __u8 dir, __u8 source, const void *buf, __u32 len,
				       __u16 tls_version)
{
	if (!sk || !len)
		return;
	struct data_event *e = data_begin(sk, dir, source);
	if (!e)
		return;
	if (!bpf_map_lookup_elem(&plain_socks, &e->cookie)) {
		__u8 one = 1;
		bpf_map_update_elem(&plain_socks, &e->cookie, &one, BPF_ANY);
	}
	e->len = len;
	e->tls_version = tls_version;
	__u32 want = payload_prefix(len);
	want &= SCRATCH_MASK;
	__u32 got = want;
	if (bpf_probe_read_user(e->data, want, buf))
		got = (__u32)-1;
	data_submit(e, got);
}

#endif /* CLOVISOR_TLS_H */
