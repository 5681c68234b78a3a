package probes

import (
	"fmt"

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
	return nil
}
