package probes

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// tracepointMode hooks BTF tracepoints: inet_sock_set_state for connection
// state and sock_send_length / sock_recv_length (Linux 6.3+) for data.
type tracepointMode struct{}

func (tracepointMode) name() string { return ModeTracepoint }

// Tracepoints the mode needs, with the kernel release that added each.
var tracepointNeeds = []struct{ tp, since string }{
	{"inet_sock_set_state", "4.16"},
	{"sock_send_length", "6.3"},
	{"sock_recv_length", "6.3"},
}

func (tracepointMode) open(t *Tracer, o *Options) error {
	for _, n := range tracepointNeeds {
		ok, err := kernelHasBTFType("btf_trace_" + n.tp)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		if !ok {
			return fmt.Errorf("%w: BTF tracepoint %s is missing (added in Linux %s)", ErrUnsupported, n.tp, n.since)
		}
	}
	spec, err := loadSocketTP()
	if err != nil {
		return err
	}
	if err := configure(spec, o); err != nil {
		return err
	}
	// Accepts are seen through the syscall tracepoints, which need tracefs.
	acceptHook := true
	unmount, err := ensureTracefs()
	if err == nil {
		if unmount != nil {
			t.add(unmount)
		}
		for _, tp := range []string{"sys_exit_accept4", "sys_exit_accept"} {
			if _, err2 := os.Stat(filepath.Join(tracefsDir, "events/syscalls", tp)); err2 != nil {
				err = fmt.Errorf("tracepoint syscalls/%s is missing (CONFIG_FTRACE_SYSCALLS): %w", tp, err2)
			}
		}
	}
	if err != nil {
		acceptHook = false
		o.Logger.Warn("accepting processes will not be known at accept time", "component", "probes", "reason", err.Error())
	}
	if err := spec.Variables["accept_hook"].Set(boolByte(acceptHook)); err != nil {
		return err
	}
	var objs socketTPObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return loadErr("tracepoint programs", err)
	}
	t.add(&objs)
	t.Events, t.stats, t.cgroups, t.ports = objs.Events, objs.Stats, objs.TracedCgroups, objs.TracedPorts
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	t.programs = map[string]*ebpf.Program{
		"tp_inet_sock_set_state": objs.TpInetSockSetState,
		"tp_sock_send_length":    objs.TpSockSendLength,
		"tp_sock_recv_length":    objs.TpSockRecvLength,
	}
	for _, p := range []*ebpf.Program{objs.TpInetSockSetState, objs.TpSockSendLength, objs.TpSockRecvLength} {
		l, err := link.AttachTracing(link.TracingOptions{Program: p, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return fmt.Errorf("attaching %s: %w", p, err)
		}
		t.add(l)
	}
	if acceptHook {
		t.programs["tp_sys_exit_accept4"] = objs.TpSysExitAccept4
		t.programs["tp_sys_exit_accept"] = objs.TpSysExitAccept
		for name, p := range map[string]*ebpf.Program{"sys_exit_accept4": objs.TpSysExitAccept4, "sys_exit_accept": objs.TpSysExitAccept} {
			l, err := link.Tracepoint("syscalls", name, p, nil)
			if err != nil {
				return fmt.Errorf("attaching to tracepoint syscalls/%s: %w", name, err)
			}
			t.add(l)
		}
	}
	return nil
}

const tracefsDir = "/sys/kernel/tracing"

// ensureTracefs mounts tracefs at /sys/kernel/tracing when it is not
// there; the returned closer (nil if it was mounted already) unmounts it.
func ensureTracefs() (io.Closer, error) {
	if _, err := os.Stat(filepath.Join(tracefsDir, "events")); err == nil {
		return nil, nil
	}
	if err := unix.Mount("tracefs", tracefsDir, "tracefs", 0, ""); err != nil {
		return nil, fmt.Errorf("mounting tracefs at %s: %w", tracefsDir, err)
	}
	return closerFunc(func() error { return unix.Unmount(tracefsDir, 0) }), nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }
