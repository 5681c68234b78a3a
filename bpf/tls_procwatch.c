//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Process watch for the TLS uprobe manager: tells user space, at once,
 * when a (traced) process executes a new program or maps a file
 * executable (the dynamic loader mapping libraries, dlopen), so that the
 * manager looks at the process's memory maps and attaches its uprobes to
 * new TLS libraries before the program uses them.
 *
 *   sched_process_exec (BTF tracepoint)   a program was executed
 *   syscalls/sys_enter_mmap, sys_exit_mmap an executable file mapping
 *                                          was made (reported at the
 *                                          exit, when it is in the maps)
 * Neither is on a network path.
 */
#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_tracing.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define PROT_EXEC 0x4

enum watch_kind {
	PROC_EXEC = 1, /* the process executed a program */
	PROC_MMAP = 2, /* the process mapped a file executable */
};

struct watch_event {
	__u32 tgid;
	__u32 kind; /* enum watch_kind */
	__u64 cgroup_id;
};

/* Set at load time. */
volatile const __u32 self_tgid = 0;
volatile const __u8 filter_cgroups = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 << 10);
} proc_events SEC(".maps");

/* Replaced by the socket tracer's map at load time. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
} traced_cgroups SEC(".maps");

/* Threads inside an mmap of a file with PROT_EXEC. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} exec_mmaps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} proc_lost SEC(".maps");

/* Force bpf2go to emit the Go types. */
const struct watch_event *unused_watch_event __attribute__((unused));
const enum watch_kind *unused_watch_kind __attribute__((unused));

static __always_inline int traced(__u64 *cgid)
{
	if ((bpf_get_current_pid_tgid() >> 32) == self_tgid)
		return 0;
	*cgid = bpf_get_current_cgroup_id();
	return !filter_cgroups || bpf_map_lookup_elem(&traced_cgroups, cgid);
}

static __always_inline void report(__u32 kind, __u64 cgid)
{
	struct watch_event *e = bpf_ringbuf_reserve(&proc_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&proc_lost, &zero);
		if (n)
			*n += 1;
		return;
	}
	e->tgid = bpf_get_current_pid_tgid() >> 32;
	e->kind = kind;
	e->cgroup_id = cgid;
	/* Rare events that user space must act on at once: wake it. */
	bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(watch_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cgid;
	if (traced(&cgid))
		report(PROC_EXEC, cgid);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int watch_mmap_enter(struct syscall_trace_enter *ctx)
{
	unsigned long prot = 0, fd = 0;
	bpf_probe_read_kernel(&prot, sizeof(prot), &ctx->args[2]);
	bpf_probe_read_kernel(&fd, sizeof(fd), &ctx->args[4]);
	if (!(prot & PROT_EXEC) || (int)fd < 0)
		return 0;
	__u64 cgid;
	if (!traced(&cgid))
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	__u8 one = 1;
	bpf_map_update_elem(&exec_mmaps, &id, &one, BPF_ANY);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_mmap")
int watch_mmap_exit(struct syscall_trace_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (!bpf_map_lookup_elem(&exec_mmaps, &id))
		return 0;
	bpf_map_delete_elem(&exec_mmaps, &id);
	if (ctx->ret < 0 && ctx->ret > -4096)
		return 0;
	report(PROC_MMAP, bpf_get_current_cgroup_id());
	return 0;
}
