package tcsessions

import (
	"errors"
	"fmt"
	"net/netip"
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
}

func newWorkloads(o *objects) *workloads {
	return &workloads{o: o, slots: map[string]uint32{}, ips: map[string][]netip.Addr{}, owner: map[netip.Addr]string{}}
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
