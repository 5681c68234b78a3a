package probes

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"

	"github.com/clovisor/clovisor/probes/internal/gobin"
)

// Go crypto/tls (bpf/tls_go.c): uprobes at the start (after the stack
// check) and on every RET instruction of crypto/tls.(*Conn).Write and
// (*Conn).Read in Go programs, found through the Go symbol table (also in
// stripped binaries) by package gobin. Each binary's struct layout (by
// its Go release) travels in the uprobes' cookies.

func init() {
	tlsProberFactories = append(tlsProberFactories, newGoTLSProber)
}

// The functions probed, as the Go symbol table names them.
const (
	goConnWrite = "crypto/tls.(*Conn).Write"
	goConnRead  = "crypto/tls.(*Conn).Read"
)

// goTLSObjects are the parts of the tlsGo object the prober loads.
type goTLSObjects struct {
	tlsGoPrograms
	Calls      *ebpf.Map      `ebpf:"go_tls_calls"`
	PayloadCap *ebpf.Variable `ebpf:"payload_cap"`
}

func (o *goTLSObjects) Close() error {
	return errors.Join(o.tlsGoPrograms.Close(), o.Calls.Close())
}

type goTLSProber struct {
	t    *Tracer
	objs goTLSObjects
	// multi: the programs attach through uprobe_multi links (Linux 6.6+),
	// one link per program and file for all its places; else one uprobe
	// (perf event) per place. Detaching a uprobe waits for the kernel's
	// grace period (~0.1 s each here): 17 of them take 2 s, one
	// uprobe_multi link one wait.
	multi bool
}

// goTLSPrograms are the prober's programs (names in bpf/tls_go.c).
var goTLSPrograms = []string{"gotls_wr_enter", "gotls_wr_ret", "gotls_rd_enter", "gotls_rd_ret"}

func newGoTLSProber(t *Tracer) (tlsProber, error) {
	return newGoTLSProberLinks(t, features.HaveBPFLinkUprobeMulti() == nil)
}

// newGoTLSProberLinks makes the prober with uprobe_multi links or not.
func newGoTLSProberLinks(t *Tracer, multi bool) (*goTLSProber, error) {
	spec, err := loadTlsGo()
	if err != nil {
		return nil, err
	}
	p := &goTLSProber{t: t, multi: multi}
	if p.multi {
		for _, name := range goTLSPrograms {
			spec.Programs[name].AttachType = ebpf.AttachTraceUprobeMulti
		}
	}
	if err := t.loadTLSObjects(spec, &p.objs); err != nil {
		return nil, loadErr("the Go crypto/tls uprobes", err)
	}
	return p, nil
}

func (p *goTLSProber) name() string { return "go_tls" }

func (p *goTLSProber) Close() error {
	p.t.dropPayloadVar(p.objs.PayloadCap)
	return p.objs.Close()
}

// goTLSProbe is a program for one function: at its entry, at its RETs.
type goTLSProbe struct {
	fn          string
	enter, exit *ebpf.Program
}

// goTLSTarget is what the prober found in one Go program: its functions
// and the layout of its Go release.
type goTLSTarget struct {
	p      *goTLSProber
	file   string // for errors
	funcs  map[string]*gobin.Func
	cookie uint64
}

// inspect finds the functions to probe if f is a Go program with
// crypto/tls.
func (p *goTLSProber) inspect(f *tlsFile) (tlsTarget, error) {
	funcs, cookie, err := analyzeGoTLS(f)
	if err != nil {
		return nil, err
	}
	return &goTLSTarget{p: p, file: f.name(), funcs: funcs, cookie: cookie}, nil
}

func (t *goTLSTarget) functions() []string {
	var out []string
	for _, fn := range []string{goConnWrite, goConnRead} {
		if t.funcs[fn] != nil {
			out = append(out, fn)
		}
	}
	return out
}

// attach places the uprobes in exe, in process pid only unless 0.
func (t *goTLSTarget) attach(exe *link.Executable, pid int) ([]link.Link, error) {
	p := t.p
	var links []link.Link
	fail := func(err error) ([]link.Link, error) {
		for _, l := range links {
			l.Close()
		}
		if pid != 0 && processGone(err) {
			return nil, err // the process ended
		}
		return nil, fmt.Errorf("%s: %w", t.file, err)
	}
	for _, pr := range []goTLSProbe{
		{goConnWrite, p.objs.GotlsWrEnter, p.objs.GotlsWrRet},
		{goConnRead, p.objs.GotlsRdEnter, p.objs.GotlsRdRet},
	} {
		fn := t.funcs[pr.fn]
		if fn == nil {
			continue
		}
		// "Entry" probes go after the stack check: the entry itself runs
		// again when the stack had to grow, and a Write reported at its
		// entry would be reported twice. (On amd64 the instruction there,
		// PUSHQ BP, is also one the kernel emulates instead of stepping
		// it out of line: one trap per call instead of two.)
		for _, at := range []struct {
			what  string
			prog  *ebpf.Program
			addrs []uint64
		}{{"the start", pr.enter, []uint64{fn.BodyOffset}}, {"the RETs", pr.exit, fn.Returns}} {
			ls, err := p.uprobes(exe, pr.fn, at.prog, at.addrs, t.cookie, pid)
			links = append(links, ls...)
			if err != nil {
				if pid != 0 && processGone(err) {
					return fail(err)
				}
				return fail(fmt.Errorf("uprobes at %s of %s (file offsets %#x): %w", at.what, pr.fn, at.addrs, err))
			}
		}
	}
	return links, nil
}

// uprobes attaches prog at the file offsets addrs of exe, with cookie, in
// process pid only unless 0.
func (p *goTLSProber) uprobes(exe *link.Executable, fn string, prog *ebpf.Program, addrs []uint64, cookie uint64, pid int) ([]link.Link, error) {
	if p.multi {
		cookies := make([]uint64, len(addrs))
		for i := range cookies {
			cookies[i] = cookie
		}
		l, err := exe.UprobeMulti(nil, prog, &link.UprobeMultiOptions{Addresses: addrs, Cookies: cookies, PID: uint32(pid)})
		if err != nil {
			return nil, err
		}
		return []link.Link{l}, nil
	}
	var links []link.Link
	for _, a := range addrs {
		l, err := exe.Uprobe(fn, prog, &link.UprobeOptions{Address: a, Cookie: cookie, PID: pid})
		if err != nil {
			return links, err
		}
		links = append(links, l)
	}
	return links, nil
}

// analyzeGoTLS finds (*Conn).Write and Read in f and packs the layout of
// its Go release into a uprobe cookie (bpf/tls_go.c, COOKIE_*). Files
// that are not Go programs, or Go programs without crypto/tls, are
// errNotMine.
func analyzeGoTLS(f *tlsFile) (map[string]*gobin.Func, uint64, error) {
	b, err := gobin.Open(f.ELF)
	if errors.Is(err, gobin.ErrNotGo) {
		return nil, 0, errNotMine
	}
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", f.name(), err)
	}
	funcs, err := b.Funcs(goConnWrite, goConnRead)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: built by %s: %w", f.name(), b.GoVersion, err)
	}
	if len(funcs) == 0 {
		has, err := b.HasPackage("crypto/tls")
		if err != nil {
			return nil, 0, fmt.Errorf("%s: built by %s: %w", f.name(), b.GoVersion, err)
		}
		if !has {
			return nil, 0, errNotMine
		}
		return nil, 0, fmt.Errorf("%s: built by %s: has crypto/tls, but neither %s nor %s in its symbol table (inlined or unused)",
			f.name(), b.GoVersion, goConnWrite, goConnRead)
	}
	if b.Arch != runtime.GOARCH {
		return nil, 0, fmt.Errorf("%s: a Go program for %s on a %s machine", f.name(), b.Arch, runtime.GOARCH)
	}
	l, err := gobin.TLSLayoutFor(b.GoVersion)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", f.name(), err)
	}
	cookie, err := goTLSCookie(l)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: built by %s: %w", f.name(), b.GoVersion, err)
	}
	return funcs, cookie, nil
}

// goTLSCookie packs a layout as bpf/tls_go.c reads it (COOKIE_*; the
// offsets it has as constants must be the layout's).
func goTLSCookie(l gobin.TLSLayout) (uint64, error) {
	const connConnOff, itabHashOff, tcpConnNetFDOff = 0, 16, 0 // CONN_CONN_OFF, ITAB_HASH_OFF, TCPCONN_NETFD_OFF
	if l.ConnConn != connConnOff || l.ITabHash != itabHashOff || l.TCPConnFD != tcpConnNetFDOff ||
		l.ConnVers >= 1<<12 || l.ConnHandshakeDone >= 1<<12 || l.NetFDSysfd >= 1<<8 {
		return 0, fmt.Errorf("struct layout %+v does not fit the uprobes' cookie", l)
	}
	return uint64(l.TCPConnHash) | l.ConnVers<<32 | l.ConnHandshakeDone<<44 | l.NetFDSysfd<<56, nil
}

// name is how errors name the file: its path in the process's mount
// namespace, or the path it was opened by.
func (f *tlsFile) name() string {
	if f.Name != "" {
		return f.Name
	}
	return f.Path
}
