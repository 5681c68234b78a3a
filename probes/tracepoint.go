package probes

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"unsafe"

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
		ok, err := t.kernelHasBTFType("btf_trace_" + n.tp)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUnsupported, err)
		}
		if !ok && n.tp == "inet_sock_set_state" {
			return fmt.Errorf("%w: BTF tracepoint %s is missing (added in Linux %s)", ErrUnsupported, n.tp, n.since)
		}
		if !ok {
			// Before 6.3: the syscalls' trace events instead.
			o.Logger.Info("tracepoint mode through syscall trace events", "component", "probes",
				"reason", fmt.Sprintf("BTF tracepoint %s is missing (added in Linux %s)", n.tp, n.since))
			return openTPSys(t, o)
		}
	}
	spec, err := loadSocketTP()
	if err != nil {
		return err
	}
	if err := configure(spec, o); err != nil {
		return err
	}
	// Accepts are seen through the syscall tracepoints, found in tracefs.
	acceptIDs, err := tracepointIDs("syscalls", "sys_exit_accept4", "sys_exit_accept")
	acceptHook := err == nil
	if err != nil {
		o.Logger.Warn("accepting processes will not be known at accept time", "component", "probes",
			"reason", err.Error())
	}
	if err := spec.Variables["accept_hook"].Set(boolByte(acceptHook)); err != nil {
		return err
	}
	var objs socketTPObjects
	if err := spec.LoadAndAssign(&objs, t.loadOpts()); err != nil {
		return loadErr("tracepoint programs", err)
	}
	t.add(&objs)
	t.Events, t.stats, t.cgroups, t.ports, t.plainSocks = objs.Events, objs.Stats, objs.TracedCgroups, objs.TracedPorts, objs.PlainSocks
	if err := t.addPayloadVar(objs.PayloadCap); err != nil {
		return err
	}
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	// Kernel TLS plaintext passes sock_sendmsg/sock_recvmsg: nothing to
	// attach for it.
	t.ktls = KTLSState{Traced: true, Hooks: []string{"tp_btf/sock_send_length", "tp_btf/sock_recv_length"}}
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
		for i, p := range []*ebpf.Program{objs.TpSysExitAccept4, objs.TpSysExitAccept} {
			if err := t.attachTracepoint(p, acceptIDs[i]); err != nil {
				return err
			}
		}
	}
	return nil
}

// tpsysEvents are the syscalls whose exits the pre-6.3 tracepoint mode
// hooks.
var tpsysEvents = []string{"sys_exit_accept4", "sys_exit_accept", "sys_exit_write", "sys_exit_writev",
	"sys_exit_sendto", "sys_exit_sendmsg", "sys_exit_read", "sys_exit_readv", "sys_exit_recvfrom", "sys_exit_recvmsg"}

// openTPSys is the tracepoint mode for kernels without sock_send_length
// and sock_recv_length (before 6.3): see bpf/socket_tpsys.c.
func openTPSys(t *Tracer, o *Options) error {
	ids, err := tracepointIDs("syscalls", tpsysEvents...)
	if err != nil {
		return fmt.Errorf("%w: no sock_send_length/sock_recv_length tracepoints (Linux 6.3+), and the syscall trace events are not usable: %v", ErrUnsupported, err)
	}
	spec, err := loadSocketTPSys()
	if err != nil {
		return err
	}
	if err := configure(spec, o); err != nil {
		return err
	}
	if err := spec.Variables["accept_hook"].Set(uint8(1)); err != nil {
		return err
	}
	var objs socketTPSysObjects
	if err := spec.LoadAndAssign(&objs, t.loadOpts()); err != nil {
		return loadErr("tracepoint programs (syscall events)", err)
	}
	t.add(&objs)
	t.Events, t.stats, t.cgroups, t.ports, t.plainSocks = objs.Events, objs.Stats, objs.TracedCgroups, objs.TracedPorts, objs.PlainSocks
	if err := t.addPayloadVar(objs.PayloadCap); err != nil {
		return err
	}
	if err := t.fillPorts(o.Ports); err != nil {
		return err
	}
	l, err := link.AttachTracing(link.TracingOptions{Program: objs.TpsInetSockSetState, AttachType: ebpf.AttachTraceRawTp})
	if err != nil {
		return fmt.Errorf("attaching %s: %w", objs.TpsInetSockSetState, err)
	}
	t.add(l)
	progs := []*ebpf.Program{objs.TpsSysExitAccept4, objs.TpsSysExitAccept, objs.TpsSysExitWrite, objs.TpsSysExitWritev,
		objs.TpsSysExitSendto, objs.TpsSysExitSendmsg, objs.TpsSysExitRead, objs.TpsSysExitReadv,
		objs.TpsSysExitRecvfrom, objs.TpsSysExitRecvmsg}
	t.ktls = KTLSState{Traced: true, Hooks: slices.Clone(tpsysEvents[2:]),
		Reason: "sendfile and splice on kernel TLS sockets are not seen (as on any socket in this mode)"}
	t.programs = map[string]*ebpf.Program{"tps_inet_sock_set_state": objs.TpsInetSockSetState}
	for i, p := range progs {
		t.programs["tps_"+tpsysEvents[i]] = p
		if err := t.attachTracepoint(p, ids[i]); err != nil {
			return err
		}
	}
	return nil
}

// attachTracepoint attaches a tracepoint program to the trace event with
// this id through a perf event and a BPF link (Linux 5.15+), so that
// nothing depends on tracefs staying mounted.
func (t *Tracer) attachTracepoint(p *ebpf.Program, id uint64) error {
	attr := unix.PerfEventAttr{
		Type:        unix.PERF_TYPE_TRACEPOINT,
		Config:      id,
		Size:        uint32(unsafe.Sizeof(unix.PerfEventAttr{})),
		Sample_type: unix.PERF_SAMPLE_RAW,
		Sample:      1,
		Wakeup:      1,
	}
	fd, err := unix.PerfEventOpen(&attr, -1, 0, -1, unix.PERF_FLAG_FD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("perf event for trace event %d (%s): %w", id, p, err)
	}
	pe := os.NewFile(uintptr(fd), "perf-tracepoint")
	t.add(pe)
	l, err := link.AttachRawLink(link.RawLinkOptions{Target: fd, Program: p, Attach: ebpf.AttachPerfEvent})
	if err != nil {
		return fmt.Errorf("attaching %s to trace event %d: %w", p, id, err)
	}
	t.add(l)
	return nil
}

const tracefsDir = "/sys/kernel/tracing"

// tracepointIDs reads the ids of trace events from tracefs: the mounted
// one, or else a private mount made for the purpose and removed at once.
func tracepointIDs(group string, names ...string) ([]uint64, error) {
	dir := tracefsDir
	if _, err := os.Stat(filepath.Join(dir, "events")); err != nil {
		tmp, err := os.MkdirTemp("", "clovisor-tracefs-")
		if err != nil {
			return nil, err
		}
		defer os.Remove(tmp)
		if err := unix.Mount("tracefs", tmp, "tracefs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
			return nil, fmt.Errorf("tracefs is not mounted and mounting it failed: %w", err)
		}
		defer unix.Unmount(tmp, unix.MNT_DETACH)
		dir = tmp
	}
	ids := make([]uint64, len(names))
	for i, name := range names {
		raw, err := os.ReadFile(filepath.Join(dir, "events", group, name, "id"))
		if err != nil {
			return nil, fmt.Errorf("trace event %s/%s (CONFIG_FTRACE_SYSCALLS): %w", group, name, err)
		}
		if ids[i], err = strconv.ParseUint(strings.TrimSpace(string(raw)), 10, 64); err != nil {
			return nil, fmt.Errorf("trace event %s/%s: id %q: %w", group, name, raw, err)
		}
	}
	return ids, nil
}
