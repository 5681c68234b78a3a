package probes

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// fentryMode hooks the kprobe mode's functions with fentry/fexit (BPF
// trampolines): tcp_v4_connect, tcp_v6_connect, inet_accept, tcp_close,
// tcp_sendmsg and tcp_recvmsg.
type fentryMode struct{}

func (fentryMode) name() string { return ModeFentry }

func (fentryMode) open(t *Tracer, o *Options) error {
	spec, err := loadSocketFentry()
	if err != nil {
		return err
	}
	if err := configure(spec, o); err != nil {
		return err
	}
	if err := setRecvmsgFlagsArg(spec); err != nil {
		return err
	}
	var objs socketFentryObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return loadErr("fentry programs", err)
		}
		return fmt.Errorf("%w: the kernel refuses fentry/fexit programs (BPF trampolines: CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS and BTF): %v", ErrUnsupported, rootCause(err))
	}
	t.add(&objs)
	t.Events, t.stats, t.cgroups, t.ports = objs.Events, objs.Stats, objs.TracedCgroups, objs.TracedPorts
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	t.programs = map[string]*ebpf.Program{
		"fx_tcp_v4_connect": objs.FxTcpV4Connect,
		"fx_tcp_v6_connect": objs.FxTcpV6Connect,
		"fx_inet_accept":    objs.FxInetAccept,
		"fe_tcp_close":      objs.FeTcpClose,
		"fx_tcp_sendmsg":    objs.FxTcpSendmsg,
		"fx_tcp_recvmsg":    objs.FxTcpRecvmsg,
	}
	for name, p := range t.programs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return fmt.Errorf("%w: attaching %s: %v", ErrUnsupported, name, err)
		}
		t.add(l)
	}
	return nil
}

// rootCause is the innermost error of a chain (e.g. the errno of a failed
// load, without the library's advice that does not apply).
func rootCause(err error) error {
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err
		}
		err = next
	}
}
