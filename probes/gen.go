package probes

// The BPF objects are generated from the C under bpf/ with Debian's clang 14
// and committed, so building Clovisor needs no C toolchain. One object per
// attach mode; all share bpf/socket.h and so the same event structs.
// TestGeneratedObjectsMatchSources regenerates them and fails on any
// difference.
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 -type conn_event -type data_event -type stat_index -type event_kind -type conn_role -type data_dir -type event_flags -type payload_source socketTP ../bpf/socket_tp.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 socketKprobe ../bpf/socket_kprobe.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 socketFentry ../bpf/socket_fentry.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 socketTPSys ../bpf/socket_tpsys.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 tlsGo ../bpf/tls_go.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 -type ssl_stat tlsOpenSSL ../bpf/tls_openssl.c -- -I../bpf/headers
//go:generate go tool bpf2go -cc clang-14 -cflags "-O2 -g -Wall -Werror" -target amd64,arm64 -type watch_event -type watch_kind tlsProcWatch ../bpf/tls_procwatch.c -- -I../bpf/headers
