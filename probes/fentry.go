package probes

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
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
	if err := t.setRecvmsgFlagsArg(spec); err != nil {
		return err
	}
	// The accept hook's variant for this kernel's inet_csk_accept.
	nargs, err := t.kernelFuncParams("inet_csk_accept")
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
	if err := spec.LoadAndAssign(into, t.loadOpts()); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return loadErr("fentry programs", err)
		}
		return fmt.Errorf("%w: the kernel refuses fentry/fexit programs (BPF trampolines: CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS and BTF): %v", ErrUnsupported, rootCause(err))
	}
	maps, progs, accept, payloadCap := objs.socketFentryMaps, objs.fentryPrograms, objs.Accept4, objs.PayloadCap
	if nargs == 2 {
		maps, progs, accept, payloadCap = objs2.socketFentryMaps, objs2.fentryPrograms, objs2.Accept2, objs2.PayloadCap
	}
	t.add(&maps)
	if err := t.addPayloadVar(payloadCap); err != nil {
		return err
	}
	t.Events, t.stats, t.cgroups, t.ports, t.plainSocks = maps.Events, maps.Stats, maps.TracedCgroups, maps.TracedPorts, maps.PlainSocks
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
	// At start, the BTF parsed for opening; later (the module loaded
	// after), a new parse that knows the module.
	cache := t.btf
	t.startKTLS(o, func() (ktlsHooks, error) {
		c := cache
		if c == nil {
			c = btf.NewCache()
		}
		cache = nil
		return fentryKTLS(spec, &maps, c)
	})
	return nil
}

// fentryKTLS loads and attaches the fexit programs on the tls module's
// functions, which load only against the module's BTF (so only once it is
// loaded), sharing the mode's maps.
func fentryKTLS(spec *ebpf.CollectionSpec, m *socketFentryMaps, cache *btf.Cache) (k ktlsHooks, err error) {
	// tls_sw_recvmsg's flags argument, as for tcp_recvmsg.
	flags, err := tlsFuncParam(cache, "tls_sw_recvmsg", "flags")
	if err != nil {
		return k, fmt.Errorf("no BTF for the tls module's functions (CONFIG_DEBUG_INFO_BTF_MODULES): %w", err)
	}
	spec = spec.Copy()
	if err := spec.Variables["recvmsg_flags_arg"].Set(uint8(flags)); err != nil {
		return k, err
	}
	opts := ebpf.CollectionOptions{Cache: cache, MapReplacements: map[string]*ebpf.Map{
		"events":         m.Events,
		"stats":          m.Stats,
		"scratch":        m.Scratch,
		"traced_cgroups": m.TracedCgroups,
		"traced_ports":   m.TracedPorts,
		"pending_conns":  m.PendingConns,
		"plain_socks":    m.PlainSocks,
	}}
	hooks := map[string]string{ // program -> function
		"fx_tls_sw_sendmsg":     "tls_sw_sendmsg",
		"fx_tls_sw_recvmsg":     "tls_sw_recvmsg",
		"fx_tls_device_sendmsg": "tls_device_sendmsg",
	}
	progs, err := loadPrograms(spec, slices.Sorted(maps.Keys(hooks)), opts)
	if err != nil {
		// tls_device_sendmsg exists only with CONFIG_TLS_DEVICE.
		var errDev error
		if progs, errDev = loadPrograms(spec, []string{"fx_tls_sw_recvmsg", "fx_tls_sw_sendmsg"}, opts); errDev != nil {
			return k, fmt.Errorf("loading fexit programs: %w", errDev)
		}
		k.notes = append(k.notes, fmt.Sprintf("tls_device_sendmsg not hooked, sends of NIC-offloaded kernel TLS (CONFIG_TLS_DEVICE) not seen: %v", rootCause(err)))
	}
	k.progs = progs
	for _, p := range progs {
		k.closers = append(k.closers, p)
	}
	for _, name := range []string{"fx_tls_sw_sendmsg", "fx_tls_sw_recvmsg", "fx_tls_device_sendmsg"} {
		p := progs[name]
		if p == nil {
			continue
		}
		l, err := link.AttachTracing(link.TracingOptions{Program: p})
		if err != nil {
			return k, fmt.Errorf("attaching fexit on %s: %w", hooks[name], err)
		}
		k.closers = append(k.closers, l)
		k.hooks = append(k.hooks, "fexit/"+hooks[name])
	}
	return k, nil
}

// loadPrograms loads these programs of spec (with the maps they use).
func loadPrograms(spec *ebpf.CollectionSpec, names []string, opts ebpf.CollectionOptions) (map[string]*ebpf.Program, error) {
	some := spec.Copy()
	some.Programs = map[string]*ebpf.ProgramSpec{}
	for _, name := range names {
		some.Programs[name] = spec.Programs[name]
	}
	coll, err := ebpf.NewCollectionWithOptions(some, opts)
	if err != nil {
		return nil, err
	}
	defer coll.Close()
	progs := map[string]*ebpf.Program{}
	for _, name := range names {
		progs[name] = coll.DetachProgram(name)
	}
	return progs, nil
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
