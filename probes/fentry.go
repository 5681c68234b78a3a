package probes

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// fentryMode hooks the kprobe mode's functions with fentry/fexit (BPF
// trampolines): tcp_v4_connect, tcp_v6_connect, inet_csk_accept,
// tcp_close, tcp_sendmsg and tcp_recvmsg, and kernel TLS's tls_sw_sendmsg,
// tls_device_sendmsg and tls_sw_recvmsg when the tls module is loaded.
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
	// The accept hook's variant for this kernel's inet_csk_accept.
	nargs, err := kernelFuncParams("inet_csk_accept")
	if err != nil {
		return err
	}
	var objs struct {
		socketFentryMaps
		socketFentryVariables
		fentryPrograms
		Accept4 *ebpf.Program `ebpf:"fx_inet_csk_accept4"`
	}
	var objs2 struct {
		socketFentryMaps
		socketFentryVariables
		fentryPrograms
		Accept2 *ebpf.Program `ebpf:"fx_inet_csk_accept2"`
	}
	var into any = &objs
	switch nargs {
	case 4:
	case 2:
		into = &objs2
	default:
		return fmt.Errorf("%w: inet_csk_accept has %d arguments, expected 4 (before Linux 6.10) or 2", ErrUnsupported, nargs)
	}
	if err := spec.LoadAndAssign(into, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return loadErr("fentry programs", err)
		}
		return fmt.Errorf("%w: the kernel refuses fentry/fexit programs (BPF trampolines: CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS and BTF): %v", ErrUnsupported, rootCause(err))
	}
	maps, progs, accept := objs.socketFentryMaps, objs.fentryPrograms, objs.Accept4
	if nargs == 2 {
		maps, progs, accept = objs2.socketFentryMaps, objs2.fentryPrograms, objs2.Accept2
	}
	t.add(&maps)
	t.Events, t.stats, t.cgroups, t.ports = maps.Events, maps.Stats, maps.TracedCgroups, maps.TracedPorts
	t.programs = map[string]*ebpf.Program{
		"fx_tcp_v4_connect":  progs.FxTcpV4Connect,
		"fx_tcp_v6_connect":  progs.FxTcpV6Connect,
		"fx_inet_csk_accept": accept,
		"fe_tcp_close":       progs.FeTcpClose,
		"fx_tcp_sendmsg":     progs.FxTcpSendmsg,
		"fx_tcp_recvmsg":     progs.FxTcpRecvmsg,
	}
	for _, p := range t.programs {
		t.add(p)
	}
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	for name, p := range t.programs {
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return fmt.Errorf("%w: attaching %s: %v", ErrUnsupported, name, err)
		}
		t.add(l)
	}
	t.startKTLS(o, func() (ktlsHooks, error) { return fentryKTLS(spec, &maps) })
	return nil
}

// fentryKTLS loads and attaches the fexit programs on the tls module's
// functions, which load only against the module's BTF (so only once it is
// loaded), sharing the mode's maps.
func fentryKTLS(spec *ebpf.CollectionSpec, m *socketFentryMaps) (k ktlsHooks, err error) {
	// tls_sw_recvmsg's flags argument, as for tcp_recvmsg.
	flags, err := tlsFuncParam("tls_sw_recvmsg", "flags")
	if err != nil {
		return k, fmt.Errorf("no BTF for the tls module's functions (CONFIG_DEBUG_INFO_BTF_MODULES): %w", err)
	}
	spec = spec.Copy()
	if err := spec.Variables["recvmsg_flags_arg"].Set(uint8(flags)); err != nil {
		return k, err
	}
	opts := &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"events":         m.Events,
		"stats":          m.Stats,
		"scratch":        m.Scratch,
		"traced_cgroups": m.TracedCgroups,
		"traced_ports":   m.TracedPorts,
		"pending_conns":  m.PendingConns,
	}}
	k.progs = map[string]*ebpf.Program{}
	for _, h := range []struct {
		fn, prog string
		optional string // what is not seen without it
	}{
		{"tls_sw_sendmsg", "fx_tls_sw_sendmsg", ""},
		{"tls_sw_recvmsg", "fx_tls_sw_recvmsg", ""},
		{"tls_device_sendmsg", "fx_tls_device_sendmsg", "sends of NIC-offloaded kernel TLS (CONFIG_TLS_DEVICE)"},
	} {
		p, err := loadProgram(spec, h.prog, opts)
		if err != nil && h.optional != "" {
			k.notes = append(k.notes, fmt.Sprintf("%s not hooked, %s not seen: %v", h.fn, h.optional, rootCause(err)))
			continue
		}
		if err != nil {
			return k, fmt.Errorf("loading fexit on %s: %w", h.fn, err)
		}
		k.closers = append(k.closers, p)
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return k, fmt.Errorf("attaching fexit on %s: %w", h.fn, err)
		}
		k.closers = append(k.closers, l)
		k.progs[h.prog] = p
		k.hooks = append(k.hooks, "fexit/"+h.fn)
	}
	return k, nil
}

// loadProgram loads one program of spec (with the maps it uses).
func loadProgram(spec *ebpf.CollectionSpec, name string, opts *ebpf.CollectionOptions) (*ebpf.Program, error) {
	one := spec.Copy()
	one.Programs = map[string]*ebpf.ProgramSpec{name: spec.Programs[name]}
	coll, err := ebpf.NewCollectionWithOptions(one, *opts)
	if err != nil {
		return nil, err
	}
	defer coll.Close()
	return coll.DetachProgram(name), nil
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

// fentryPrograms are the fentry mode's programs but for the accept hook.
type fentryPrograms struct {
	FxTcpV4Connect *ebpf.Program `ebpf:"fx_tcp_v4_connect"`
	FxTcpV6Connect *ebpf.Program `ebpf:"fx_tcp_v6_connect"`
	FeTcpClose     *ebpf.Program `ebpf:"fe_tcp_close"`
	FxTcpSendmsg   *ebpf.Program `ebpf:"fx_tcp_sendmsg"`
	FxTcpRecvmsg   *ebpf.Program `ebpf:"fx_tcp_recvmsg"`
}
