package tcsessions

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
)

// Traffic is what a workload sent and received through the node
// interfaces. Bytes are IP bytes (a GSO/GRO packet counts its headers once
// per segment), packets are wire packets.
type Traffic struct {
	RxBytes, RxPackets uint64 // addressed to the workload
	TxBytes, TxPackets uint64 // from the workload
}

// workloads maps workload names to slots of the workload_traffic table and
// fills workload_ips. It is safe for concurrent use.
type workloads struct {
	mu    sync.Mutex
	o     *objects
	slots map[string]uint32       // workload -> slot
	ips   map[string][]netip.Addr // workload -> its addresses
	owner map[netip.Addr]string   // address -> workload
	free  []uint32                // released slots
	next  uint32                  // first never-used slot
	// api are the workloads named through set (SetWorkload); auto the
	// workloads of pod veths by veth (setAuto), autoNames their names.
	api       map[string]bool
	auto      map[int]autoWorkload
	autoNames map[string]bool
}

// autoWorkload is the workload at the other end of a pod veth.
type autoWorkload struct {
	name  string
	addrs []netip.Addr
}

func newWorkloads(o *objects) *workloads {
	return &workloads{o: o, slots: map[string]uint32{}, ips: map[string][]netip.Addr{}, owner: map[netip.Addr]string{},
		api: map[string]bool{}, auto: map[int]autoWorkload{}, autoNames: map[string]bool{}}
}

// errWorkloadsFull says every slot of the traffic table is taken.
var errWorkloadsFull = errors.New("workload table full")

// set makes ips the addresses of workload name (replacing its earlier ones).
// An address that belonged to another workload moves to this one.
func (w *workloads) set(name string, ips ...netip.Addr) error {
	if name == "" {
		return errors.New("workload without a name")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.api[name] = true
	delete(w.autoNames, name)
	return w.setLocked(name, ips)
}

func (w *workloads) setLocked(name string, ips []netip.Addr) error {
	slot, ok := w.slots[name]
	if !ok {
		switch {
		case len(w.free) > 0:
			slot, w.free = w.free[len(w.free)-1], w.free[:len(w.free)-1]
		case w.next < maxWorkloads:
			slot = w.next
			w.next++
		default:
			return fmt.Errorf("%w (%d workloads)", errWorkloadsFull, maxWorkloads)
		}
		// A reused slot starts from zero.
		if err := w.zero(slot); err != nil {
			w.free = append(w.free, slot)
			return err
		}
		w.slots[name] = slot
	}
	keep := map[netip.Addr]bool{}
	for _, ip := range ips {
		ip = ip.Unmap()
		keep[ip] = true
		if err := w.o.WorkloadIps.Put(addr16(ip), slot); err != nil {
			return fmt.Errorf("workload %s address %s: %w", name, ip, err)
		}
		if prev, ok := w.owner[ip]; ok && prev != name {
			w.ips[prev] = without(w.ips[prev], ip)
		}
		w.owner[ip] = name
	}
	for _, old := range w.ips[name] {
		if !keep[old] {
			w.deleteIP(old)
		}
	}
	list := make([]netip.Addr, 0, len(keep))
	for ip := range keep {
		list = append(list, ip)
	}
	w.ips[name] = list
	return nil
}

// remove forgets a workload and its addresses; its slot is reused later.
func (w *workloads) remove(name string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.api, name)
	return w.removeLocked(name)
}

func (w *workloads) removeLocked(name string) error {
	slot, ok := w.slots[name]
	if !ok {
		return nil
	}
	var errs []error
	for _, ip := range w.ips[name] {
		errs = append(errs, w.deleteIP(ip))
	}
	delete(w.ips, name)
	delete(w.slots, name)
	w.free = append(w.free, slot)
	return errors.Join(errs...)
}

func (w *workloads) deleteIP(ip netip.Addr) error {
	delete(w.owner, ip)
	err := w.o.WorkloadIps.Delete(addr16(ip))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

func (w *workloads) zero(slot uint32) error {
	per := make([]tcWorkloadCounters, ebpf.MustPossibleCPU())
	return w.o.WorkloadTraffic.Put(slot, per)
}

// traffic reads the counters of every workload.
func (w *workloads) traffic() (map[string]Traffic, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]Traffic, len(w.slots))
	var per []tcWorkloadCounters
	for name, slot := range w.slots {
		if err := w.o.WorkloadTraffic.Lookup(slot, &per); err != nil {
			return nil, fmt.Errorf("reading the traffic of %s: %w", name, err)
		}
		var t Traffic
		for _, c := range per {
			t.RxBytes += c.RxBytes
			t.RxPackets += c.RxPackets
			t.TxBytes += c.TxBytes
			t.TxPackets += c.TxPackets
		}
		out[name] = t
	}
	return out, nil
}

func without(list []netip.Addr, x netip.Addr) []netip.Addr {
	out := list[:0]
	for _, a := range list {
		if a != x {
			out = append(out, a)
		}
	}
	return out
}

// owner returns the workload an address belongs to ("" when none).
func (w *workloads) ownerOf(ip netip.Addr) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.owner[ip.Unmap()]
}

// setAuto makes want the workloads of the pod veths (by veth): each name
// gets the addresses of all its veths but those a workload named through
// set holds; a name set through set is left alone; names of earlier calls
// no longer wanted are removed.
func (w *workloads) setAuto(want map[int]autoWorkload) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.auto = want
	byName := map[string][]netip.Addr{}
	for _, a := range want {
		if a.name == "" || w.api[a.name] {
			continue
		}
		list := byName[a.name]
		for _, ip := range a.addrs {
			if o, ok := w.owner[ip]; ok && w.api[o] {
				continue
			}
			if !slices.Contains(list, ip) {
				list = append(list, ip)
			}
		}
		byName[a.name] = list
	}
	var errs []error
	for name := range w.autoNames {
		if _, ok := byName[name]; !ok {
			errs = append(errs, w.removeLocked(name))
			delete(w.autoNames, name)
		}
	}
	for name, ips := range byName {
		slices.SortFunc(ips, netip.Addr.Compare)
		cur := slices.Clone(w.ips[name])
		slices.SortFunc(cur, netip.Addr.Compare)
		if w.autoNames[name] && slices.Equal(cur, ips) {
			continue
		}
		w.autoNames[name] = true
		errs = append(errs, w.setLocked(name, ips))
	}
	return errors.Join(errs...)
}

// autoName is the workload of a pod veth ("" when none).
func (w *workloads) autoName(ifindex int) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.auto[ifindex].name
}

// addresses returns every workload's addresses, sorted.
func (w *workloads) addresses() map[string][]netip.Addr {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string][]netip.Addr, len(w.ips))
	for name, ips := range w.ips {
		l := slices.Clone(ips)
		slices.SortFunc(l, netip.Addr.Compare)
		out[name] = l
	}
	return out
}
