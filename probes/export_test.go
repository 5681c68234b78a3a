package probes

import (
	"debug/elf"
	"errors"

	"github.com/cilium/ebpf/link"
)

// AttachGoTLS loads the Go crypto/tls prober into t and attaches it to the
// executable at path, for the tests of package probes_test (which may
// import sockets); detach closes the links and the prober.
func AttachGoTLS(t *Tracer, path string) (detach func() error, err error) {
	p, err := newGoTLSProber(t)
	if err != nil {
		return nil, err
	}
	ef, err := elf.Open(path)
	if err != nil {
		p.Close()
		return nil, err
	}
	defer ef.Close()
	exe, err := link.OpenExecutable(path)
	if err != nil {
		p.Close()
		return nil, err
	}
	links, err := attachFile(p, &tlsFile{Path: path, Name: path, ELF: ef, Exe: exe})
	if err != nil {
		p.Close()
		return nil, err
	}
	return func() error {
		var errs []error
		for _, l := range links {
			errs = append(errs, l.Close())
		}
		return errors.Join(append(errs, p.Close())...)
	}, nil
}

// attachFile inspects f with p and attaches what it found, for every
// process that maps the file.
func attachFile(p tlsProber, f *tlsFile) ([]link.Link, error) {
	target, err := p.inspect(f)
	if err != nil {
		return nil, err
	}
	return target.attach(f.Exe, 0)
}
