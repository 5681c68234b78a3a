package probes

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"reflect"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// TLS plaintext comes from uprobes on TLS libraries (bpf/tls.h): each
// implementation is a tlsProber, which recognises its library in an
// executable file and attaches its uprobes there. The uprobe objects write
// into the socket tracer's ring buffer and obey its filters, so their
// events join the socket tracer's connections in user space.

// tlsFile is an executable or shared library that some traced process maps
// executable, opened once for every prober.
type tlsFile struct {
	// Path is the file as the agent opens it: /proc/self/fd/<n> of a
	// descriptor the manager holds while the probers attach, so that the
	// file stays reachable even when the process that revealed it ends.
	Path string
	// Name is the file's path in the mount namespace of the process that
	// revealed it (as /proc/<pid>/maps shows it), for logs; Root is that
	// process's root (/proc/<pid>/root), under which Name's neighbours are
	// found.
	Name, Root string
	// ELF is the parsed file.
	ELF *elf.File
	// Exe is the file for attaching uprobes.
	Exe *link.Executable
}

// errNotMine is what a prober's inspect returns for a file that holds none
// of its TLS implementation.
var errNotMine = errors.New("no TLS implementation of this kind")

// tlsProber is one TLS implementation (OpenSSL, Go crypto/tls).
type tlsProber interface {
	// name is the implementation's name in logs ("openssl", "go_tls").
	name() string
	// inspect looks for the implementation in f and returns how to probe
	// it, or errNotMine. Any other error names what is missing (for
	// example a Go binary whose version or struct offsets are unknown).
	// It runs once per file; the target is attached to the file once, or
	// once per process that maps it.
	inspect(f *tlsFile) (tlsTarget, error)
	// Close unloads the prober's programs (after its links are closed).
	Close() error
}

// tlsTarget is the uprobes of one implementation in one file.
type tlsTarget interface {
	// attach attaches the uprobes to exe (the file inspect looked at, or
	// the same file opened again): in process pid only, or in every
	// process that maps the file when pid is 0.
	attach(exe *link.Executable, pid int) ([]link.Link, error)
}

// loadTLSObjects loads a TLS uprobe object (built from a C file including
// bpf/tls.h) into objs, sharing the tracer's ring buffer, statistics and
// filter maps, with the tracer's settings and socket cookie scheme. objs
// must have a PayloadCap *ebpf.Variable field for payload_cap: it is
// registered for SetPayloadBytes, and the caller unregisters it
// (dropPayloadVar) when it unloads the object.
func (t *Tracer) loadTLSObjects(spec *ebpf.CollectionSpec, objs any) error {
	capField := reflect.ValueOf(objs).Elem().FieldByName("PayloadCap")
	if !capField.IsValid() || capField.Type() != reflect.TypeFor[*ebpf.Variable]() {
		return fmt.Errorf("%T has no PayloadCap *ebpf.Variable field", objs)
	}
	o := t.options()
	if err := configure(spec, &o); err != nil {
		return err
	}
	fromPtr := uint8(0)
	if t.cookieMult != 0 {
		fromPtr = 1
		if err := spec.Variables["cookie_mult"].Set(t.cookieMult); err != nil {
			return fmt.Errorf("setting cookie_mult: %w", err)
		}
	}
	if err := spec.Variables["cookie_from_ptr"].Set(fromPtr); err != nil {
		return fmt.Errorf("setting cookie_from_ptr: %w", err)
	}
	err := spec.LoadAndAssign(objs, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		"events":         t.Events,
		"stats":          t.stats,
		"traced_cgroups": t.cgroups,
		"traced_ports":   t.ports,
		"plain_socks":    t.plainSocks,
	}})
	if err != nil {
		return err
	}
	// A SetPayloadBytes since the options were read above is applied here.
	if err := t.addPayloadVar(capField.Interface().(*ebpf.Variable)); err != nil {
		if c, ok := objs.(io.Closer); ok {
			c.Close()
		}
		return err
	}
	return nil
}

// tlsProberFactories make the probers, one per TLS implementation; each
// prober's file registers its factory from an init function.
var tlsProberFactories []func(t *Tracer) (tlsProber, error)
