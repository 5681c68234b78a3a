// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Wire-level session tracing: tc programs attached to both hooks of an
 * interface, through tcx where the kernel has it (6.6+) and as cls_bpf
 * filters (direct action) under a clsact qdisc otherwise. They run the code
 * of bpf/tc.h and always let the packet pass.
 *
 * tc (kernels from 6.4 on) has one program, clv_tc, on both hooks: a
 * packet crossing two interfaces (leaving one pod, entering another) runs
 * the same code twice, and the second run finds it in the instruction
 * cache, where two programs would each have theirs fetched again on every
 * run. It asks the kernel which hook it runs at when it needs to know.
 * tcInline (older kernels) has a program for each hook.
 */
#include "tc.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#ifndef CLV_INLINE_ALL
SEC("tc")
int clv_tc(struct __sk_buff *skb)
{
	return handle(skb, HOOK_ASK);
}
#else
SEC("tc")
int clv_tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, HOOK_INGRESS);
}

SEC("tc")
int clv_tc_egress(struct __sk_buff *skb)
{
	return handle(skb, HOOK_EGRESS);
}
#endif
