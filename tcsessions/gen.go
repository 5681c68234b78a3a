package tcsessions

// The BPF objects are generated from bpf/tc.c with Debian's clang 14 and
// committed, so building Clovisor needs no C toolchain.
// TestGeneratedObjectsMatchSources regenerates them and fails on any
// difference. -mcpu=v3 gives the atomic exchange and compare-and-exchange
// instructions the session state needs (Linux 5.12+). tcInline is the same
// programs with every function inlined (CLV_INLINE_ALL, bpf/tc.h), for
// kernels whose verifier cannot take BPF subprograms in its stride
// (inlineKernel).
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target amd64,arm64 -type exchange_event -type payload_event -type flow_key -type session -type tc_event_kind -type tc_dir -type tc_phase -type exchange_end -type conn_flag -type iface_flag -type tc_stat_index -type port_key -type egress_key -type iface_cfg -type workload_counters -type conn_tuple -type dir_counters -type dir_state tc ../bpf/tc.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -DCLV_INLINE_ALL" -target amd64,arm64 tcInline ../bpf/tc.c -- -I../bpf/headers
