package podmap

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// HostInterface is the node-side end of a pod's network interface.
type HostInterface struct {
	Name  string
	Index int
	// How says how it was found: "netns" (the pod's eth0 names its peer)
	// or "route" (the node's route to the pod IP).
	How string
}

// FindHostVeth finds the node-side end of a pod's veth without entering the
// pod: from one of its processes (pid), it opens the pod's network
// namespace (/proc/<pid>/ns/net), reads eth0's peer interface index
// (IFLA_LINK) there with netlink, and looks that index up in the node's
// namespace (host: a netlink handle in it). When that fails (no process,
// no eth0, a peer elsewhere), it falls back to the node's route to podIP,
// which must go out through a veth. pid 0 skips the first way.
func FindHostVeth(host *netlink.Handle, pid int, podIP netip.Addr) (HostInterface, error) {
	var errs []error
	if pid > 0 {
		hi, err := vethByNetns(host, pid)
		if err == nil {
			return hi, nil
		}
		errs = append(errs, err)
	}
	if podIP.IsValid() {
		hi, err := vethByRoute(host, podIP)
		if err == nil {
			return hi, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return HostInterface{}, errors.New("neither a process nor an IP of the pod is known")
	}
	return HostInterface{}, errors.Join(errs...)
}

func vethByNetns(host *netlink.Handle, pid int) (HostInterface, error) {
	path := "/proc/" + strconv.Itoa(pid) + "/ns/net"
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return HostInterface{}, fmt.Errorf("pod network namespace %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return HostInterface{}, fmt.Errorf("netlink in %s: %w", path, err)
	}
	defer h.Close()
	lk, err := h.LinkByName("eth0")
	if err != nil {
		return HostInterface{}, fmt.Errorf("eth0 in %s: %w", path, err)
	}
	peer := lk.Attrs().ParentIndex
	if lk.Type() != "veth" || peer == 0 {
		return HostInterface{}, fmt.Errorf("eth0 in %s is a %s without a peer index", path, lk.Type())
	}
	hl, err := host.LinkByIndex(peer)
	if err != nil {
		return HostInterface{}, fmt.Errorf("eth0's peer (ifindex %d) in the node's namespace: %w", peer, err)
	}
	if hl.Type() != "veth" || hl.Attrs().ParentIndex != lk.Attrs().Index {
		return HostInterface{}, fmt.Errorf("ifindex %d in the node's namespace is %s (%s), not eth0's peer", peer, hl.Attrs().Name, hl.Type())
	}
	return HostInterface{Name: hl.Attrs().Name, Index: hl.Attrs().Index, How: "netns"}, nil
}

func vethByRoute(host *netlink.Handle, ip netip.Addr) (HostInterface, error) {
	routes, err := host.RouteGet(ip.AsSlice())
	if err != nil {
		return HostInterface{}, fmt.Errorf("route to %s: %w", ip, err)
	}
	if len(routes) == 0 {
		return HostInterface{}, fmt.Errorf("no route to %s", ip)
	}
	lk, err := host.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return HostInterface{}, fmt.Errorf("route to %s: interface %d: %w", ip, routes[0].LinkIndex, err)
	}
	if lk.Type() != "veth" {
		return HostInterface{}, fmt.Errorf("route to %s goes through %s, a %s, not a pod veth", ip, lk.Attrs().Name, lk.Type())
	}
	return HostInterface{Name: lk.Attrs().Name, Index: lk.Attrs().Index, How: "route"}, nil
}
