package probes

import (
	"errors"
	"fmt"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

// errNotBuilt says a mode whose kernel support was found has no programs in
// this build yet.
var errNotBuilt = errors.New("mode not implemented in this build")

// kprobeMode will hook tcp_v4_connect, tcp_v6_connect, tcp_sendmsg,
// skb_copy_datagram_iter, inet_csk_accept and tcp_close with kprobes. For
// now it probes the kernel for kprobe support, so the log says why it is
// not used.
type kprobeMode struct{}

func (kprobeMode) name() string { return ModeKprobe }

func (kprobeMode) open(t *Tracer, o *Options) error {
	if _, err := os.Stat("/sys/bus/event_source/devices/kprobe/type"); err != nil {
		if _, err2 := os.Stat("/sys/kernel/tracing/kprobe_events"); err2 != nil {
			return fmt.Errorf("%w: no kprobe PMU (/sys/bus/event_source/devices/kprobe) and no tracefs kprobe_events: the kernel is built without CONFIG_KPROBES", ErrUnsupported)
		}
	}
	prog, err := trivialProgram(ebpf.Kprobe, ebpf.AttachNone)
	if err != nil {
		return fmt.Errorf("%w: loading a kprobe program: %v", ErrUnsupported, err)
	}
	defer prog.Close()
	l, err := link.Kprobe("tcp_sendmsg", prog, nil)
	if err != nil {
		return fmt.Errorf("%w: kprobe on tcp_sendmsg (needs CONFIG_KPROBES): %v", ErrUnsupported, err)
	}
	l.Close()
	return errNotBuilt
}

// fentryMode will hook the same functions as kprobeMode with fentry/fexit.
type fentryMode struct{}

func (fentryMode) name() string { return ModeFentry }

func (fentryMode) open(t *Tracer, o *Options) error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Tracing,
		AttachType:   ebpf.AttachTraceFEntry,
		AttachTo:     "tcp_sendmsg",
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("%w: the kernel refuses fentry programs on tcp_sendmsg (BPF trampolines: CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS, BTF): %v", ErrUnsupported, errors.Unwrap(err))
	}
	defer prog.Close()
	l, err := link.AttachTracing(link.TracingOptions{Program: prog})
	if err != nil {
		return fmt.Errorf("%w: attaching fentry to tcp_sendmsg: %v", ErrUnsupported, err)
	}
	l.Close()
	return errNotBuilt
}

func trivialProgram(typ ebpf.ProgramType, at ebpf.AttachType) (*ebpf.Program, error) {
	return ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		AttachType:   at,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
}
