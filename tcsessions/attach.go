package tcsessions

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Role is what an interface is to the node.
type Role uint8

const (
	// RolePod is the host side of a pod's veth (point pod_veth).
	RolePod Role = iota + 1
	// RoleNode is a node NIC (point node_nic): traffic is also counted
	// per workload.
	RoleNode
)

func (r Role) String() string {
	switch r {
	case RolePod:
		return "pod_veth"
	case RoleNode:
		return "node_nic"
	}
	return fmt.Sprintf("role-%d", uint8(r))
}

// Names of what Clovisor leaves in the kernel, by which a later instance
// recognises it.
const (
	// FilterHandle is the handle of Clovisor's cls_bpf filters.
	FilterHandle = 0xc10
	// FilterNamePrefix starts the name of Clovisor's cls_bpf filters
	// (FilterNamePrefix + "ingress" / "egress").
	FilterNamePrefix = "clovisor_tc_"
	// pinPrefix starts the names of pinned tcx links in Config.PinDir:
	// tcx_<ifindex>_<hook>.
	pinPrefix = "tcx_"
)

// hook is one of the two tc hooks of an interface.
type hook struct {
	name   string // "ingress" or "egress"
	tcx    ebpf.AttachType
	parent uint32 // clsact parent
}

var hooks = [2]hook{
	{"ingress", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS},
	{"egress", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS},
}

// attachment is what Clovisor made on one interface, in creation order.
type attachment struct {
	ifindex int
	name    string
	role    Role
	mode    string // AttachTCX or AttachClsact
	// netnsID and peerIndex: a veth's peer, its namespace's id in the
	// node's namespace (-1: none) and its index there.
	netnsID, peerIndex int

	links []link.Link // tcx, by hook
	pins  []string    // pinned tcx links
	// clsact
	filters      []*netlink.BpfFilter
	createdQdisc bool
}

// Interface is an interface the programs are attached to.
type Interface struct {
	Name  string
	Index int
	Role  Role
	// Mode is AttachTCX or AttachClsact.
	Mode string
}

func (a *attachment) info() Interface {
	return Interface{Name: a.name, Index: a.ifindex, Role: a.role, Mode: a.mode}
}

func (t *Tracer) program(h hook) *ebpf.Program {
	if h.name == "ingress" {
		return t.objs.Ingress
	}
	return t.objs.Egress
}

// attachTCX attaches both programs with tcx links, first in the chain of
// each hook so that the packet is seen before another program can
// redirect it, pinning them when configured.
func (t *Tracer) attachTCX(a *attachment) error {
	for _, h := range hooks {
		var l link.Link
		err := t.ns.do(func() error {
			var err error
			l, err = link.AttachTCX(link.TCXOptions{
				Interface: a.ifindex,
				Program:   t.program(h),
				Attach:    h.tcx,
				Anchor:    link.Head(),
			})
			return err
		})
		if err != nil {
			return fmt.Errorf("tcx %s on %s: %w", h.name, a.name, err)
		}
		a.links = append(a.links, l)
		if t.cfg.PinDir != "" {
			p := filepath.Join(t.cfg.PinDir, fmt.Sprintf("%s%d_%s", pinPrefix, a.ifindex, h.name))
			if err := l.Pin(p); err != nil {
				return fmt.Errorf("pinning the tcx %s link of %s at %s: %w", h.name, a.name, p, err)
			}
			a.pins = append(a.pins, p)
		}
	}
	return nil
}

// attachClsact adds the programs as cls_bpf filters under the interface's
// clsact qdisc, making the qdisc when there is none (and recording that it
// did, in the state file, before anything else can fail).
func (t *Tracer) attachClsact(a *attachment) error {
	nl := t.ns.nl
	lk, err := nl.LinkByIndex(a.ifindex)
	if err != nil {
		return fmt.Errorf("interface %s: %w", a.name, err)
	}
	found, err := hasClsact(nl, lk)
	if err != nil {
		return err
	}
	if !found {
		q := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: a.ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		}}
		if err := t.state.add(a.ifindex, a.name); err != nil {
			return err
		}
		if err := nl.QdiscAdd(q); err != nil {
			_ = t.state.remove(a.ifindex)
			return fmt.Errorf("adding a clsact qdisc to %s: %w", a.name, err)
		}
		a.createdQdisc = true
	}
	for _, h := range hooks {
		f := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: a.ifindex,
				Parent:    h.parent,
				Handle:    FilterHandle,
				Protocol:  unix.ETH_P_ALL,
				Priority:  t.cfg.FilterPriority,
			},
			Fd:           t.program(h).FD(),
			Name:         FilterNamePrefix + h.name,
			DirectAction: true,
		}
		err := nl.FilterAdd(f)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EEXIST) {
			// The priority holds filters of another protocol (or
			// a filter with our handle that is not ours): let the
			// kernel choose one.
			t.log.Info("filter priority taken, the kernel picks one", "interface", a.name,
				"hook", h.name, "priority", t.cfg.FilterPriority, "reason", err.Error())
			f.Priority = 0
			err = nl.FilterAdd(f)
		}
		if err != nil {
			return fmt.Errorf("adding the %s filter to %s: %w", h.name, a.name, err)
		}
		// Record the filter as the kernel has it (its priority).
		mine, err := ourFilters(nl, lk, h.parent)
		if err != nil {
			return err
		}
		if len(mine) == 0 {
			return fmt.Errorf("the %s filter added to %s is not listed", h.name, a.name)
		}
		a.filters = append(a.filters, mine[0])
	}
	return nil
}

// hasClsact reports whether the interface has a clsact qdisc.
func hasClsact(nl *netlink.Handle, lk netlink.Link) (bool, error) {
	qs, err := nl.QdiscList(lk)
	if err != nil {
		return false, fmt.Errorf("listing the qdiscs of %s: %w", lk.Attrs().Name, err)
	}
	for _, q := range qs {
		if q.Type() == "clsact" {
			return true, nil
		}
	}
	return false, nil
}

// isOurs recognises a filter Clovisor made: a cls_bpf filter with its
// handle and name.
func isOurs(f netlink.Filter) (*netlink.BpfFilter, bool) {
	bf, ok := f.(*netlink.BpfFilter)
	if !ok || bf.Handle != FilterHandle || !strings.HasPrefix(bf.Name, FilterNamePrefix) {
		return nil, false
	}
	return bf, true
}

// ourFilters lists Clovisor's filters on one clsact hook.
func ourFilters(nl *netlink.Handle, lk netlink.Link, parent uint32) ([]*netlink.BpfFilter, error) {
	fs, err := nl.FilterList(lk, parent)
	if err != nil {
		return nil, fmt.Errorf("listing the filters of %s: %w", lk.Attrs().Name, err)
	}
	var out []*netlink.BpfFilter
	for _, f := range fs {
		if bf, ok := isOurs(f); ok {
			out = append(out, bf)
		}
	}
	return out, nil
}

// deleteFilter removes one filter; a filter or interface already gone is
// not an error.
func deleteFilter(nl *netlink.Handle, f *netlink.BpfFilter) error {
	del := &netlink.BpfFilter{FilterAttrs: f.FilterAttrs, Fd: -1}
	err := nl.FilterDel(del)
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.EINVAL) {
		return nil
	}
	return fmt.Errorf("deleting filter %x prio %d on ifindex %d: %w", f.Handle, f.Priority, f.LinkIndex, err)
}

// removeQdiscIfEmpty removes the clsact qdisc of an interface when no
// filter is left on either hook. It reports whether it removed it.
func removeQdiscIfEmpty(nl *netlink.Handle, ifindex int) (bool, error) {
	lk, err := nl.LinkByIndex(ifindex)
	if err != nil {
		return false, nil // the interface is gone, and its qdisc with it
	}
	for _, h := range hooks {
		fs, err := nl.FilterList(lk, h.parent)
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				return false, nil // no clsact qdisc
			}
			return false, fmt.Errorf("listing the filters of %s: %w", lk.Attrs().Name, err)
		}
		if len(fs) > 0 {
			return false, nil
		}
	}
	found, err := hasClsact(nl, lk)
	if err != nil || !found {
		return false, err
	}
	q := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: ifindex,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_CLSACT,
	}}
	if err := nl.QdiscDel(q); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return false, fmt.Errorf("deleting the clsact qdisc of %s: %w", lk.Attrs().Name, err)
	}
	return true, nil
}

// detach removes what the attachment made, in reverse order. A device that
// is gone took its links and filters with it.
func (t *Tracer) detach(a *attachment) error {
	var errs []error
	for i := len(a.filters) - 1; i >= 0; i-- {
		errs = append(errs, deleteFilter(t.ns.nl, a.filters[i]))
	}
	a.filters = nil
	if a.createdQdisc {
		removed, err := removeQdiscIfEmpty(t.ns.nl, a.ifindex)
		errs = append(errs, err)
		if err == nil {
			if !removed {
				t.log.Info("clsact qdisc left in place: other filters use it", "interface", a.name)
			}
			errs = append(errs, t.state.remove(a.ifindex))
		}
		a.createdQdisc = false
	}
	for i := len(a.links) - 1; i >= 0; i-- {
		l := a.links[i]
		if i < len(a.pins) {
			if err := l.Unpin(); err != nil {
				errs = append(errs, fmt.Errorf("unpinning %s: %w", a.pins[i], err))
			}
		}
		// Detach first: Close alone leaves a link attached while
		// another holder (a pin we could not remove) keeps it.
		if err := l.Detach(); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOLINK) &&
			!errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("detaching a tcx link of %s: %w", a.name, err))
		}
		errs = append(errs, l.Close())
	}
	a.links, a.pins = nil, nil
	errs = append(errs, t.objs.clearInterface(a.ifindex))
	return errors.Join(errs...)
}
