package probes

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
)

// kprobeMode hooks tcp_v4_connect, tcp_v6_connect, inet_csk_accept,
// tcp_close, tcp_sendmsg, tcp_recvmsg and skb_copy_datagram_iter with
// kprobes and kretprobes, and kernel TLS's tls_sw_sendmsg,
// tls_device_sendmsg and tls_sw_recvmsg when the tls module is loaded.
type kprobeMode struct{}

func (kprobeMode) name() string { return ModeKprobe }

func (kprobeMode) open(t *Tracer, o *Options) error {
	if _, err := os.Stat("/sys/bus/event_source/devices/kprobe/type"); err != nil {
		return fmt.Errorf("%w: no kprobe PMU (/sys/bus/event_source/devices/kprobe): the kernel is built without CONFIG_KPROBES", ErrUnsupported)
	}
	spec, err := loadSocketKprobe()
	if err != nil {
		return err
	}
	if err := configure(spec, o); err != nil {
		return err
	}
	if err := t.setRecvmsgFlagsArg(spec); err != nil {
		return err
	}
	// Stands in for the socket cookie (kprobes may not make cookies): a
	// random odd multiplier keeps kernel addresses out of the events.
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	t.cookieMult = binary.LittleEndian.Uint64(b[:]) | 1
	if err := spec.Variables["cookie_mult"].Set(t.cookieMult); err != nil {
		return err
	}
	var objs socketKprobeObjects
	if err := spec.LoadAndAssign(&objs, t.loadOpts()); err != nil {
		return loadErr("kprobe programs", err)
	}
	t.add(&objs)
	if err := t.addPayloadVar(objs.PayloadCap); err != nil {
		return err
	}
	t.Events, t.stats, t.cgroups, t.ports, t.plainSocks = objs.Events, objs.Stats, objs.TracedCgroups, objs.TracedPorts, objs.PlainSocks
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	hooks := []struct {
		fn   string
		ret  bool
		prog *ebpf.Program
	}{
		{"tcp_v4_connect", false, objs.KpTcpV4Connect},
		{"tcp_v4_connect", true, objs.KrpTcpV4Connect},
		{"tcp_v6_connect", false, objs.KpTcpV6Connect},
		{"tcp_v6_connect", true, objs.KrpTcpV6Connect},
		{"inet_csk_accept", true, objs.KrpInetCskAccept},
		{"tcp_close", false, objs.KpTcpClose},
		{"tcp_sendmsg", false, objs.KpTcpSendmsg},
		{"tcp_sendmsg", true, objs.KrpTcpSendmsg},
		{"tcp_recvmsg", false, objs.KpTcpRecvmsg},
		{"tcp_recvmsg", true, objs.KrpTcpRecvmsg},
		{"skb_copy_datagram_iter", false, objs.KpSkbCopyDatagramIter},
		{"skb_copy_datagram_iter", true, objs.KrpSkbCopyDatagramIter},
	}
	t.programs = map[string]*ebpf.Program{}
	for _, h := range hooks {
		attach, kind := link.Kprobe, "kprobe"
		if h.ret {
			attach, kind = link.Kretprobe, "kretprobe"
		}
		l, err := attach(h.fn, h.prog, nil)
		if err != nil {
			return fmt.Errorf("%w: %s on %s: %v", ErrUnsupported, kind, h.fn, err)
		}
		t.add(l)
		info, _ := h.prog.Info()
		if info != nil {
			t.programs[info.Name] = h.prog
		}
	}
	t.startKTLS(o, func() (k ktlsHooks, err error) {
		k.progs = map[string]*ebpf.Program{}
		for _, h := range []struct {
			fn       string
			prog     *ebpf.Program
			ret      *ebpf.Program
			optional string // what is not seen without it
		}{
			{"tls_sw_sendmsg", objs.KpTlsSendmsg, objs.KrpTlsSendmsg, ""},
			{"tls_sw_recvmsg", objs.KpTlsRecvmsg, objs.KrpTlsRecvmsg, ""},
			{"tls_device_sendmsg", objs.KpTlsSendmsg, objs.KrpTlsSendmsg, "sends of NIC-offloaded kernel TLS (CONFIG_TLS_DEVICE)"},
		} {
			entry, err := link.Kprobe(h.fn, h.prog, nil)
			if err != nil && h.optional != "" {
				k.notes = append(k.notes, fmt.Sprintf("%s not hooked, %s not seen: %v", h.fn, h.optional, err))
				continue
			}
			if err != nil {
				return k, fmt.Errorf("kprobe on %s: %w", h.fn, err)
			}
			k.closers = append(k.closers, entry)
			exit, err := link.Kretprobe(h.fn, h.ret, nil)
			if err != nil {
				return k, fmt.Errorf("kretprobe on %s: %w", h.fn, err)
			}
			k.closers = append(k.closers, exit)
			k.hooks = append(k.hooks, "kprobe/"+h.fn, "kretprobe/"+h.fn)
			for _, p := range []*ebpf.Program{h.prog, h.ret} {
				if info, _ := p.Info(); info != nil {
					k.progs[info.Name] = p
				}
			}
		}
		return k, nil
	})
	return nil
}

// kernelFuncProto returns a kernel function's prototype from the
// kernel's BTF.
func (t *Tracer) kernelFuncProto(name string) (*btf.FuncProto, error) {
	kspec, err := t.btf.Kernel()
	if err != nil {
		return nil, fmt.Errorf("%w: kernel BTF: %v", ErrUnsupported, err)
	}
	var fn *btf.Func
	if err := kspec.TypeByName(name, &fn); err != nil {
		return nil, fmt.Errorf("%w: %s in kernel BTF: %v", ErrUnsupported, name, err)
	}
	proto, ok := fn.Type.(*btf.FuncProto)
	if !ok {
		return nil, fmt.Errorf("%s: no prototype in kernel BTF", name)
	}
	return proto, nil
}

// kernelFuncParams returns how many parameters a kernel function has.
func (t *Tracer) kernelFuncParams(name string) (int, error) {
	proto, err := t.kernelFuncProto(name)
	if err != nil {
		return 0, err
	}
	return len(proto.Params), nil
}

// setRecvmsgFlagsArg tells the programs which argument of tcp_recvmsg
// holds the flags on this kernel, from its BTF.
func (t *Tracer) setRecvmsgFlagsArg(spec *ebpf.CollectionSpec) error {
	proto, err := t.kernelFuncProto("tcp_recvmsg")
	if err != nil {
		return err
	}
	for i, p := range proto.Params {
		if p.Name == "flags" {
			return spec.Variables["recvmsg_flags_arg"].Set(uint8(i))
		}
	}
	return fmt.Errorf("%w: tcp_recvmsg has no flags argument in kernel BTF", ErrUnsupported)
}
