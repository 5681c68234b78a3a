package tcsessions

import (
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nsWorker runs functions in the network namespace the tracer works in:
// tcx links and BPF program queries name interfaces by index, which the
// kernel resolves in the calling thread's namespace. With a namespace set,
// the functions run on one OS thread that entered it and never leaves it
// (the thread ends with the worker instead of going back to the Go
// scheduler); without, they run on the caller's thread.
type nsWorker struct {
	path string
	fns  chan func()
	done chan struct{}
	// nl is a netlink (route) handle whose socket lives in the namespace.
	nl *netlink.Handle
	// ns is the namespace's handle for netlink subscriptions (closed by
	// close), netns.None() for the current one.
	ns netns.NsHandle
}

func newNSWorker(path string) (*nsWorker, error) {
	w := &nsWorker{path: path, ns: netns.None()}
	if path == "" {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return nil, fmt.Errorf("netlink: %w", err)
		}
		w.nl = h
		return w, nil
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("network namespace %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink in %s: %w", path, err)
	}
	w.ns, w.nl = ns, h
	fns, done := make(chan func()), make(chan struct{})
	w.fns, w.done = fns, done
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread leaves with this goroutine.
		f, err := os.Open(path)
		if err != nil {
			started <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			started <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		started <- nil
		for {
			select {
			case fn := <-fns:
				fn()
			case <-done:
				return
			}
		}
	}()
	if err := <-started; err != nil {
		h.Close()
		ns.Close()
		return nil, err
	}
	return w, nil
}

// do runs fn in the namespace and returns its error.
func (w *nsWorker) do(fn func() error) error {
	if w.fns == nil {
		return fn()
	}
	errc := make(chan error, 1)
	w.fns <- func() { errc <- fn() }
	return <-errc
}

func (w *nsWorker) close() {
	if w.done != nil {
		close(w.done)
		w.done = nil
	}
	if w.nl != nil {
		w.nl.Close()
		w.nl = nil
	}
	if w.ns != netns.None() {
		w.ns.Close()
		w.ns = netns.None()
	}
}
