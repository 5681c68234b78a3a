// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/*
 * Wire-level session tracing: one program for each tc hook of an
 * interface, attached through tcx where the kernel has it (6.6+) and as
 * cls_bpf filters (direct action) under a clsact qdisc otherwise. Both run
 * the same code (bpf/tc.h) and always let the packet pass.
 */
#include "tc.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int clv_tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, 1);
}

SEC("tc")
int clv_tc_egress(struct __sk_buff *skb)
{
	return handle(skb, 0);
}
