package tcsessions

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Tracer is the tc programs loaded, their tables filled and attached to
// the selected interfaces. Its methods are safe for concurrent use.
type Tracer struct {
	cfg   Config
	log   *slog.Logger
	objs  *objects
	ns    *nsWorker
	state *stateFile
	wl    *workloads

	mu       sync.Mutex
	mode     string              // resolved attach mode ("" until the first attach in auto mode)
	attached map[int]*attachment // by ifindex
	order    []int               // ifindexes in attach order
	closed   bool
	cleaned  CleanupReport
	// gone remembers the interfaces no longer traced, for the records
	// that arrive after them (bounded: cleared when it grows large).
	gone map[int]Interface

	watchDone chan struct{} // closed when the watcher has stopped
	stopWatch chan struct{}

	// The workloads of pod veths (peers.go).
	peerKick chan struct{}
	peerStop chan struct{}
	peerDone chan struct{}
}

// Open loads the programs, fills the tables from cfg, removes what an
// earlier instance left behind (see Cleanup), attaches to the selected
// interfaces and, unless cfg.NoWatch, follows interfaces that appear and
// go. An interface that cannot be attached to is logged and skipped; Open
// fails only when nothing can work (loading, the tables, clean-up).
func Open(cfg Config) (*Tracer, error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raising the memlock limit: %w", err)
	}
	t := &Tracer{
		cfg:      cfg,
		log:      cfg.Logger.With("component", "tcsessions"),
		state:    newStateFile(cfg.StateDir),
		attached: map[int]*attachment{},
	}
	if cfg.Attach != AttachAuto {
		t.mode = cfg.Attach
	}
	var err error
	if t.ns, err = newNSWorker(cfg.Netns); err != nil {
		return nil, err
	}
	if t.objs, err = loadObjects(&t.cfg); err != nil {
		t.ns.close()
		return nil, err
	}
	t.wl = newWorkloads(t.objs)
	if err := t.fillTables(); err != nil {
		t.Close()
		return nil, err
	}
	if t.cfg.PinDir != "" {
		if err := os.MkdirAll(t.cfg.PinDir, 0o700); err != nil {
			t.Close()
			return nil, fmt.Errorf("pin directory: %w", err)
		}
	}
	if t.cleaned, err = cleanupStale(&t.cfg, t.ns, t.state, t.log); err != nil {
		t.Close()
		return nil, fmt.Errorf("removing stale objects: %w", err)
	}
	if !cfg.NoWatch {
		// Subscribe before the scan so that no interface falls between.
		if err := t.watch(); err != nil {
			t.Close()
			return nil, err
		}
	}
	if err := t.scan(); err != nil {
		t.Close()
		return nil, err
	}
	t.startPeers()
	return t, nil
}

// fillTables writes the configured ports and egress matches.
func (t *Tracer) fillTables() error {
	for _, p := range t.cfg.Ports {
		if p.Interface != "" {
			continue // written when the interface is attached
		}
		if err := t.SetPort(p); err != nil {
			return err
		}
	}
	for _, p := range t.cfg.IgnorePorts {
		if err := t.objs.setPort(0, p, ProtocolIgnore); err != nil {
			return fmt.Errorf("ignoring port %d: %w", p, err)
		}
	}
	for _, e := range t.cfg.Egress {
		if err := t.SetEgress(e); err != nil {
			return err
		}
	}
	return nil
}

// SetPort adds or changes a traced server port (on p.Interface only,
// which must be attached, or on every interface).
func (t *Tracer) SetPort(p Port) error {
	id, err := ProtocolID(p.Protocol)
	if err != nil {
		return err
	}
	idx := 0
	if p.Interface != "" {
		if idx = t.indexOf(p.Interface); idx == 0 {
			return fmt.Errorf("port %d: interface %s is not traced", p.Port, p.Interface)
		}
	}
	if err := t.objs.setPort(idx, p.Port, id); err != nil {
		return fmt.Errorf("port %d: %w", p.Port, err)
	}
	return nil
}

// RemovePort stops tracing a server port (on iface, "" for every
// interface). Connections already traced go on.
func (t *Tracer) RemovePort(port uint16, iface string) error {
	idx := 0
	if iface != "" {
		if idx = t.indexOf(iface); idx == 0 {
			return nil
		}
	}
	return t.objs.deletePort(idx, port)
}

// SetEgress adds or changes an egress match.
func (t *Tracer) SetEgress(e EgressMatch) error {
	id, err := ProtocolID(e.Protocol)
	if err != nil {
		return err
	}
	if !e.Prefix.IsValid() {
		return errors.New("egress match without a valid prefix")
	}
	if err := t.objs.setEgress(e.Prefix, e.Port, id); err != nil {
		return fmt.Errorf("egress %s port %d: %w", e.Prefix, e.Port, err)
	}
	return nil
}

// RemoveEgress removes an egress match.
func (t *Tracer) RemoveEgress(prefix netip.Prefix, port uint16) error {
	return t.objs.deleteEgress(prefix, port)
}

func (t *Tracer) indexOf(name string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	for idx, a := range t.attached {
		if a.name == name {
			return idx
		}
	}
	return 0
}

// scan attaches to every selected interface present now.
func (t *Tracer) scan() error {
	links, err := t.ns.nl.LinkList()
	if err != nil {
		return fmt.Errorf("listing interfaces: %w", err)
	}
	var defaults map[int]bool
	if has(t.cfg.NodeInterfaces, SelectDefaultRoute) {
		if defaults, err = defaultRouteLinks(t.ns.nl); err != nil {
			return err
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, lk := range links {
		if role := t.roleOf(lk, defaults); role != 0 {
			if err := supported(lk); err != nil {
				t.log.Info("selected interface not traced", "interface", lk.Attrs().Name, "reason", err.Error())
				continue
			}
			if err := t.attachLocked(lk, role); err != nil {
				t.log.Warn("cannot trace interface", "interface", lk.Attrs().Name, "error", err.Error())
			}
		}
	}
	return nil
}

// supported says why the programs cannot run on an interface: they read
// an Ethernet header first.
func supported(lk netlink.Link) error {
	at := lk.Attrs()
	if at.EncapType != "ether" || at.Flags&net.FlagLoopback != 0 {
		return fmt.Errorf("link type %q: the programs need Ethernet frames", at.EncapType)
	}
	return nil
}

// roleOf says whether the configuration selects an interface, and as what.
func (t *Tracer) roleOf(lk netlink.Link, defaults map[int]bool) Role {
	at := lk.Attrs()
	if at.Flags&net.FlagLoopback != 0 {
		return 0
	}
	if selects(t.cfg.NodeInterfaces, at.Name) || defaults[at.Index] {
		return RoleNode
	}
	if selects(t.cfg.PodInterfaces, at.Name) ||
		(has(t.cfg.PodInterfaces, SelectHostVeths) && lk.Type() == "veth" && at.NetNsID >= 0) {
		return RolePod
	}
	return 0
}

// Attach traces an interface by name, as a pod veth or a node NIC,
// whatever the configuration selects. Attaching an interface already
// traced changes nothing.
func (t *Tracer) Attach(name string, role Role) error {
	if role != RolePod && role != RoleNode {
		return fmt.Errorf("attach %s: role %v", name, role)
	}
	lk, err := t.ns.nl.LinkByName(name)
	if err != nil {
		return fmt.Errorf("interface %s: %w", name, err)
	}
	if err := supported(lk); err != nil {
		return fmt.Errorf("interface %s: %w", name, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.attachLocked(lk, role)
}

// Detach stops tracing an interface and removes what was made on it.
func (t *Tracer) Detach(name string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	for idx, a := range t.attached {
		if a.name == name {
			return t.removeLocked(idx, true)
		}
	}
	return fmt.Errorf("interface %s is not traced", name)
}

func (t *Tracer) attachLocked(lk netlink.Link, role Role) error {
	if t.closed {
		return errors.New("tracer closed")
	}
	at := lk.Attrs()
	if _, ok := t.attached[at.Index]; ok {
		return nil
	}
	a := &attachment{ifindex: at.Index, name: at.Name, role: role, netnsID: -1}
	if lk.Type() == "veth" && at.NetNsID >= 0 {
		a.netnsID, a.peerIndex = at.NetNsID, at.ParentIndex
	}
	flags := ifaceSessions
	if role == RoleNode {
		flags |= ifaceWorkloads
	}
	if err := t.objs.setInterface(a.ifindex, flags); err != nil {
		return fmt.Errorf("interface %s: %w", a.name, err)
	}
	for _, p := range t.cfg.Ports {
		if p.Interface == a.name {
			id, _ := ProtocolID(p.Protocol)
			if err := t.objs.setPort(a.ifindex, p.Port, id); err != nil {
				t.objs.clearInterface(a.ifindex)
				return fmt.Errorf("port %d on %s: %w", p.Port, a.name, err)
			}
		}
	}
	err := t.attachMode(a)
	if err != nil {
		if derr := t.detach(a); derr != nil {
			err = errors.Join(err, derr)
		}
		t.clearPorts(a)
		return err
	}
	t.attached[a.ifindex] = a
	t.order = append(t.order, a.ifindex)
	t.log.Info("tracing interface", "interface", a.name, "ifindex", a.ifindex, "role", role.String(), "mode", a.mode)
	if a.netnsID >= 0 && role == RolePod {
		t.kickPeers()
	}
	return nil
}

// attachMode attaches with the resolved mode; in auto mode the first
// attach decides (tcx, or clsact when the kernel has no tcx).
func (t *Tracer) attachMode(a *attachment) error {
	mode := t.mode
	if mode == "" || mode == AttachTCX {
		a.mode = AttachTCX
		err := t.attachTCX(a)
		if err == nil {
			t.mode = AttachTCX
			return nil
		}
		if mode != "" || !errors.Is(err, ebpf.ErrNotSupported) {
			return err
		}
		t.log.Info("tcx not supported by this kernel, using clsact", "reason", err.Error())
		if derr := t.detach(a); derr != nil {
			return derr
		}
		if err := t.objs.setInterface(a.ifindex, ifaceFlags(a.role)); err != nil {
			return err
		}
		t.mode = AttachClsact
	}
	a.mode = AttachClsact
	return t.attachClsact(a)
}

func ifaceFlags(r Role) uint32 {
	if r == RoleNode {
		return ifaceSessions | ifaceWorkloads
	}
	return ifaceSessions
}

func (t *Tracer) clearPorts(a *attachment) {
	for _, p := range t.cfg.Ports {
		if p.Interface == a.name {
			_ = t.objs.deletePort(a.ifindex, p.Port)
		}
	}
}

// removeLocked detaches an interface (live: remove what was made; gone:
// the kernel removed it with the device, only forget).
func (t *Tracer) removeLocked(idx int, live bool) error {
	a, ok := t.attached[idx]
	if !ok {
		return nil
	}
	delete(t.attached, idx)
	if t.gone == nil || len(t.gone) >= 4096 {
		t.gone = map[int]Interface{}
	}
	t.gone[idx] = a.info()
	for i, x := range t.order {
		if x == idx {
			t.order = append(t.order[:i], t.order[i+1:]...)
			break
		}
	}
	var err error
	if live {
		err = t.detach(a)
	} else {
		// The device took its filters, qdisc and tcx attachments.
		a.filters = nil
		if a.createdQdisc {
			err = t.state.remove(a.ifindex)
			a.createdQdisc = false
		}
		err = errors.Join(err, t.detach(a))
	}
	t.clearPorts(a)
	t.log.Info("stopped tracing interface", "interface", a.name, "ifindex", a.ifindex, "gone", !live)
	t.kickPeers()
	return err
}

// Interfaces lists the traced interfaces, in attach order.
func (t *Tracer) Interfaces() []Interface {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Interface, 0, len(t.order))
	for _, idx := range t.order {
		out = append(out, t.attached[idx].info())
	}
	return out
}

// interfaceName returns the name and role of a traced interface (for
// records that arrive after it went, the last name known).
func (t *Tracer) interfaceName(idx int) (string, Role, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if a, ok := t.attached[idx]; ok {
		return a.name, a.role, true
	}
	if g, ok := t.gone[idx]; ok {
		return g.Name, g.Role, true
	}
	return "", 0, false
}

// Mode is the attach mode in use: AttachTCX, AttachClsact, or "" when
// nothing was attached yet in auto mode.
func (t *Tracer) Mode() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.mode
}

// Cleaned reports what Open removed of an earlier instance.
func (t *Tracer) Cleaned() CleanupReport { return t.cleaned }

// Events is the ring buffer of exchange records and payload prefixes
// (read it with Run).
func (t *Tracer) Events() *ebpf.Map { return t.objs.TcEvents }

// Programs returns the hooks' programs by name, for their run-time
// statistics: clv_tc on both hooks (kernels from 6.4 on), or clv_tc_ingress
// and clv_tc_egress.
func (t *Tracer) Programs() map[string]*ebpf.Program { return t.objs.programs() }

// Stats reads the kernel's counters.
func (t *Tracer) Stats() (Stats, error) { return t.objs.readStats() }

// Sessions returns the entries of the sessions table (the connections
// being followed now).
func (t *Tracer) Sessions() ([]SessionInfo, error) { return t.objs.readSessions() }

// SetWorkload makes ips the addresses of a local workload (a pod), whose
// traffic through the node interfaces is then counted. Calling it again
// replaces the addresses; an address moves from any other workload.
func (t *Tracer) SetWorkload(name string, ips ...netip.Addr) error { return t.wl.set(name, ips...) }

// RemoveWorkload forgets a workload and its counters.
func (t *Tracer) RemoveWorkload(name string) error { return t.wl.remove(name) }

// WorkloadTraffic returns what each workload sent and received through
// the node interfaces since SetWorkload first named it.
func (t *Tracer) WorkloadTraffic() (map[string]Traffic, error) { return t.wl.traffic() }

// Close stops following interfaces, removes every link, filter and qdisc
// it made (in reverse order) and unloads the programs.
func (t *Tracer) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.mu.Unlock()

	var errs []error
	t.stopPeers()
	if t.stopWatch != nil {
		close(t.stopWatch)
		select {
		case <-t.watchDone:
		case <-time.After(5 * time.Second):
			errs = append(errs, errors.New("the interface watcher did not stop"))
		}
	}
	t.mu.Lock()
	order := append([]int(nil), t.order...)
	for i := len(order) - 1; i >= 0; i-- {
		errs = append(errs, t.removeLocked(order[i], true))
	}
	t.mu.Unlock()
	if t.objs != nil {
		errs = append(errs, t.objs.Close())
	}
	t.ns.close()
	return errors.Join(errs...)
}

// watch follows interfaces that appear (attaching the selected ones) and
// go (forgetting them).
func (t *Tracer) watch() error {
	ch := make(chan netlink.LinkUpdate, 256)
	t.stopWatch = make(chan struct{})
	t.watchDone = make(chan struct{})
	opts := netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) {
			select {
			case <-t.stopWatch:
			default:
				t.log.Warn("interface watch", "error", err.Error())
			}
		},
	}
	if t.cfg.Netns != "" {
		ns := t.ns.ns
		opts.Namespace = &ns
	}
	if err := netlink.LinkSubscribeWithOptions(ch, t.stopWatch, opts); err != nil {
		close(t.watchDone)
		t.stopWatch = nil
		return fmt.Errorf("subscribing to interface changes: %w", err)
	}
	go func() {
		defer close(t.watchDone)
		for {
			select {
			case u, ok := <-ch:
				if !ok {
					return
				}
				t.update(u)
			case <-t.stopWatch:
				// The subscription's socket closes; drain what
				// it still delivers.
				for range ch {
				}
				return
			}
		}
	}()
	return nil
}

func (t *Tracer) update(u netlink.LinkUpdate) {
	at := u.Link.Attrs()
	switch u.Header.Type {
	case unix.RTM_DELLINK:
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed {
			return
		}
		if err := t.removeLocked(at.Index, false); err != nil {
			t.log.Warn("forgetting a removed interface", "interface", at.Name, "error", err.Error())
		}
	case unix.RTM_NEWLINK:
		var defaults map[int]bool
		if has(t.cfg.NodeInterfaces, SelectDefaultRoute) {
			// A new interface rarely carries the default route;
			// look only when it is not selected otherwise.
			if t.roleOf(u.Link, nil) == 0 {
				defaults, _ = defaultRouteLinks(t.ns.nl)
			}
		}
		role := t.roleOf(u.Link, defaults)
		if role == 0 || supported(u.Link) != nil {
			return
		}
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.closed {
			return
		}
		if _, ok := t.attached[at.Index]; ok {
			return
		}
		if err := t.attachLocked(u.Link, role); err != nil {
			t.log.Warn("cannot trace a new interface", "interface", at.Name, "error", err.Error())
		}
	}
}

// WorkloadOf returns the workload an address belongs to (SetWorkload, or
// the address of a pod veth's peer), "" when none.
func (t *Tracer) WorkloadOf(ip netip.Addr) string { return t.wl.ownerOf(ip) }

// workloadAt names the workload of an exchange's end inside an interface:
// the workload of its address, else, on a pod veth, the veth's.
func (t *Tracer) workloadAt(ifindex int, addr netip.Addr) string {
	if w := t.wl.ownerOf(addr); w != "" {
		return w
	}
	return t.wl.autoName(ifindex)
}

// Workloads returns the addresses of every workload whose traffic the node
// interfaces count: those given with SetWorkload and those found at the
// other end of pod veths (see Config.WorkloadRefresh).
func (t *Tracer) Workloads() map[string][]netip.Addr { return t.wl.addresses() }
