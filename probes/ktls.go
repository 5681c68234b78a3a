package probes

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Kernel TLS (kTLS): a TCP socket with the "tls" upper-layer protocol
// (setsockopt(TCP_ULP, "tls"), then keys with SOL_TLS TLS_TX / TLS_RX)
// encrypts and decrypts in the kernel, so its socket calls move plaintext.
// Every mode reports such data with source SourceKTLS, the plaintext byte
// count, the payload as the process wrote or read it, no sequence number,
// and the TLS version of the kernel's TLS context (bpf/socket.h).
//
// Where each mode sees it:
//   - tracepoint (6.3+): sock_send_length / sock_recv_length fire in
//     sock_sendmsg / sock_recvmsg with the TLS layer's result, the
//     plaintext count; before 6.3 the syscall exits give the same count.
//     The kernel's own TCP calls below the TLS layer (tcp_sendmsg_locked,
//     tcp_read_sock) pass neither. Nothing to attach: these hooks tell a
//     kTLS socket by its ULP (one load on any other socket).
//   - kprobe, fentry: tcp_sendmsg and tcp_recvmsg are replaced, for a
//     direction with a key, by the tls module's tls_sw_sendmsg (or
//     tls_device_sendmsg, for NIC offload) and tls_sw_recvmsg, hooked in
//     their place. Those are module functions: they are attached when the
//     module is loaded, at start or later (ktlsWatchInterval).

// KTLSModule is the kernel module that implements kernel TLS.
const KTLSModule = "tls"

// ktlsWatchInterval is how often a kprobe or fentry tracer looks for the
// tls module when it was not loaded at start (the kernel loads it when a
// process first asks for kernel TLS), and for its removal.
var ktlsWatchInterval = time.Second

// KTLSState says whether a tracer sees the plaintext of kernel TLS sockets.
type KTLSState struct {
	// Traced is true when kernel TLS sockets are traced now.
	Traced bool
	// Hooks names what sees them: kernel functions (kprobe, fentry) or
	// the mode's own hooks (tracepoint).
	Hooks []string
	// Reason says why they are not traced (when Traced is false), or what
	// is not covered.
	Reason string
}

// KTLS reports whether the tracer sees kernel TLS plaintext now.
func (t *Tracer) KTLS() KTLSState {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.ktls
	s.Hooks = slices.Clone(s.Hooks)
	return s
}

// ktlsAttacher attaches a mode's hooks on the tls module's functions. It
// returns what it made, in creation order, the programs by name and the
// hooks (e.g. "kretprobe/tls_sw_sendmsg"); a hook that is optional on this
// kernel (tls_device_sendmsg without CONFIG_TLS_DEVICE) is left out with a
// note.
type ktlsAttacher func() (k ktlsHooks, err error)

// ktlsHooks is what a ktlsAttacher made.
type ktlsHooks struct {
	closers []io.Closer
	progs   map[string]*ebpf.Program
	hooks   []string
	notes   []string
}

// How startKTLS learns about the TLS layer (replaced in tests).
var (
	tlsIsBuiltIn = (*Tracer).tlsBuiltIn
	tlsIsLive    = tlsModuleLive
)

// tlsBuiltIn reports whether the TLS layer is built into the kernel
// (its functions are in vmlinux's BTF).
func (t *Tracer) tlsBuiltIn() bool {
	ok, _ := t.kernelHasBTFType("tls_sw_sendmsg")
	return ok
}

// tlsModuleLive reports whether the tls module is loaded and initialised.
func tlsModuleLive() bool {
	b, err := os.ReadFile("/sys/module/" + KTLSModule + "/initstate")
	return err == nil && strings.TrimSpace(string(b)) == "live"
}

// startKTLS attaches the kTLS hooks now if the TLS layer is there, and
// watches for the tls module (its arrival, its removal) unless it is
// built in. Failing to hook kernel TLS does not fail the mode: it is
// logged, and KTLS says why.
func (t *Tracer) startKTLS(o *Options, attach ktlsAttacher) {
	log := o.Logger.With("component", "probes", "mode", t.Mode)
	present := tlsIsLive()
	builtin := !present && tlsIsBuiltIn(t)
	present = present || builtin
	if present {
		t.attachKTLS(log, attach)
	} else {
		t.setKTLS(KTLSState{Reason: "the tls module is not loaded: no kernel TLS socket can exist until it is; its functions are hooked when it loads"})
		log.Info("kernel TLS: the tls module is not loaded; kernel TLS sockets cannot exist until it is, and its functions are hooked when it loads",
			"watch_interval", ktlsWatchInterval, "not_covered", "calls in the first interval after the module loads")
	}
	if builtin {
		return
	}
	stop, done := make(chan struct{}), make(chan struct{})
	t.stopKTLS = func() { close(stop); <-done }
	go func() {
		defer close(done)
		tick := time.NewTicker(ktlsWatchInterval)
		defer tick.Stop()
		was := present
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			now := tlsIsLive()
			switch {
			case now && !was:
				log.Info("kernel TLS: the tls module is loaded")
				t.attachKTLS(log, attach)
			case !now && was:
				// kprobes on a removed module's functions never fire
				// again, even if it comes back: start over.
				log.Info("kernel TLS: the tls module was removed; its hooks are closed until it loads again")
				if err := t.closeKTLS(); err != nil {
					log.Warn("kernel TLS: closing the hooks", "err", err)
				}
				t.setKTLS(KTLSState{Reason: "the tls module was removed: no kernel TLS socket can exist until it loads again"})
			}
			was = now
		}
	}()
}

// attachKTLS attaches the hooks and records the outcome.
func (t *Tracer) attachKTLS(log *slog.Logger, attach ktlsAttacher) {
	k, err := attach()
	if err != nil {
		for i := len(k.closers) - 1; i >= 0; i-- {
			k.closers[i].Close()
		}
		reason := fmt.Sprintf("hooking the tls module's functions: %v", err)
		t.setKTLS(KTLSState{Reason: reason})
		log.Warn("kernel TLS sockets are not traced in this mode", "reason", reason)
		return
	}
	t.mu.Lock()
	t.ktlsClosers = k.closers
	t.ktlsProgs = slices.Sorted(maps.Keys(k.progs))
	for name, p := range k.progs {
		t.programs[name] = p
	}
	t.ktls = KTLSState{Traced: true, Hooks: k.hooks, Reason: strings.Join(k.notes, "; ")}
	t.mu.Unlock()
	log.Info("kernel TLS hooked", "hooks", strings.Join(k.hooks, ","), "notes", strings.Join(k.notes, "; "))
}

func (t *Tracer) setKTLS(s KTLSState) {
	t.mu.Lock()
	t.ktls = s
	t.mu.Unlock()
}

// closeKTLS closes the kTLS hooks (in reverse order) and forgets their
// programs.
func (t *Tracer) closeKTLS() error {
	t.mu.Lock()
	closers := t.ktlsClosers
	t.ktlsClosers = nil
	for _, name := range t.ktlsProgs {
		delete(t.programs, name)
	}
	t.ktlsProgs = nil
	t.mu.Unlock()
	var errs []error
	for i := len(closers) - 1; i >= 0; i-- {
		if err := closers[i].Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// tlsFuncParam returns the index of a parameter of a function of the TLS
// layer, from the BTF of the tls module, or of vmlinux (built in).
func tlsFuncParam(cache *btf.Cache, fn, param string) (int, error) {
	spec, err := cache.Module(KTLSModule)
	if errors.Is(err, fs.ErrNotExist) {
		spec, err = cache.Kernel()
	}
	if err != nil {
		return 0, err
	}
	var f *btf.Func
	if err := spec.TypeByName(fn, &f); err != nil {
		return 0, fmt.Errorf("%s in BTF: %w", fn, err)
	}
	proto, ok := f.Type.(*btf.FuncProto)
	if !ok {
		return 0, fmt.Errorf("%s: no prototype in BTF", fn)
	}
	for i, p := range proto.Params {
		if p.Name == param {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%s has no parameter %s in BTF", fn, param)
}
