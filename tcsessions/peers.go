package tcsessions

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Workloads of pod veths: the tracer names the workload at the other end of
// every traced pod veth and maps the addresses of the veth's peer interface
// (in the peer's network namespace) to it, so that the node interfaces
// count each workload's traffic, and wire spans name their service, with
// no configuration. The peer's namespace is the one whose namespace id, in
// the node's namespace, is the veth's link-netnsid; it is found among the
// namespaces `ip netns` named (/run/netns) and those of processes
// (/proc/PID/ns/net). The workload is named after the first of:
//
//   - the namespace's name in /run/netns;
//   - the container of the namespace's oldest process: the first 12 hex
//     digits of a container ID in its cgroup path (containerd, CRI-O,
//     Docker, Podman, in both cgroup drivers' forms);
//   - the last element of that process's cgroup v2 path, without .scope or
//     .service;
//   - the veth's name.
//
// Addresses are the peer interface's global unicast ones (link-local,
// loopback and multicast addresses are not unique to a workload). They are
// read when a pod veth is attached and again every Config.WorkloadRefresh,
// so that addresses assigned after the veth appeared (as CNI plugins do)
// or changed later are followed; a veth that goes takes its addresses with
// it. Addresses a caller gave with SetWorkload are never taken over.
//
// Namespaces are opened only for the time of a query: a descriptor or
// netlink socket kept open would keep a deleted pod's namespace, and with
// it its veth, alive.

// peerNS is what the tracer knows of one peer namespace.
type peerNS struct {
	ino  uint64 // the namespace's inode
	path string // where to open it
	name string // the workload's name ("" to use the veth's)
}

// peerState is the workloads of pod veths, kept by the refresh goroutine.
type peerState struct {
	byNSID map[int]peerNS // peer namespaces, by id in the node's namespace
	nodeNS uint64         // the node namespace's inode (never a peer)
}

// podVeth is a pod veth to name the peer of.
type podVeth struct {
	ifindex, nsid, peer int
	name                string
}

// podVeths lists the traced pod veths whose peer lives in another
// namespace.
func (t *Tracer) podVeths() []podVeth {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []podVeth
	for _, idx := range t.order {
		a := t.attached[idx]
		if a.role == RolePod && a.netnsID >= 0 && a.peerIndex > 0 {
			out = append(out, podVeth{ifindex: a.ifindex, nsid: a.netnsID, peer: a.peerIndex, name: a.name})
		}
	}
	return out
}

// startPeers starts the goroutine that keeps the workloads of pod veths.
func (t *Tracer) startPeers() {
	if t.cfg.WorkloadRefresh < 0 {
		return
	}
	t.peerKick = make(chan struct{}, 1)
	t.peerStop = make(chan struct{})
	t.peerDone = make(chan struct{})
	st := &peerState{byNSID: map[int]peerNS{}}
	if fi, err := os.Stat(t.nodeNSPath()); err == nil {
		st.nodeNS = fi.Sys().(*syscall.Stat_t).Ino
	}
	t.syncPeers(st)
	go func() {
		defer close(t.peerDone)
		tick := time.NewTicker(t.cfg.WorkloadRefresh)
		defer tick.Stop()
		for {
			select {
			case <-t.peerStop:
				return
			case <-tick.C:
			case <-t.peerKick:
			}
			t.syncPeers(st)
		}
	}()
}

func (t *Tracer) stopPeers() {
	if t.peerStop != nil {
		close(t.peerStop)
		<-t.peerDone
		t.peerStop = nil
	}
}

// kickPeers asks the refresh goroutine for a pass now.
func (t *Tracer) kickPeers() {
	if t.peerKick != nil {
		select {
		case t.peerKick <- struct{}{}:
		default:
		}
	}
}

func (t *Tracer) nodeNSPath() string {
	if t.cfg.Netns != "" {
		return t.cfg.Netns
	}
	return "/proc/self/ns/net"
}

// syncPeers names the workload of every pod veth and sets its addresses.
func (t *Tracer) syncPeers(st *peerState) {
	veths := t.podVeths()
	want := make(map[int]autoWorkload, len(veths))
	scanned := false
	for _, v := range veths {
		ns, ok := st.byNSID[v.nsid]
		var addrs []netip.Addr
		var err error
		if ok {
			addrs, err = t.peerAddrs(ns, v)
		}
		if !ok || errors.Is(err, errNSMoved) {
			if !scanned {
				st.byNSID = t.scanNamespaces(st.nodeNS)
				scanned = true
			}
			if ns, ok = st.byNSID[v.nsid]; ok {
				addrs, err = t.peerAddrs(ns, v)
			}
		}
		if err != nil {
			t.log.Debug("peer addresses", "interface", v.name, "error", err.Error())
		}
		name := ns.name
		if name == "" {
			name = v.name
		}
		want[v.ifindex] = autoWorkload{name: name, addrs: addrs}
	}
	if err := t.wl.setAuto(want); err != nil {
		t.log.Warn("workloads of pod veths", "error", err.Error())
	}
}

// errNSMoved says a namespace's path now names another namespace.
var errNSMoved = errors.New("the namespace is gone")

// peerAddrs reads the global unicast addresses of a veth's peer.
func (t *Tracer) peerAddrs(ns peerNS, v podVeth) ([]netip.Addr, error) {
	h, err := netns.GetFromPath(ns.path)
	if err != nil {
		return nil, errNSMoved
	}
	defer h.Close()
	var fst unix.Stat_t
	if err := unix.Fstat(int(h), &fst); err != nil || fst.Ino != ns.ino {
		return nil, errNSMoved
	}
	if id, err := t.ns.nl.GetNetNsIdByFd(int(h)); err != nil || id != v.nsid {
		return nil, errNSMoved
	}
	nl, err := netlink.NewHandleAt(h, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", ns.path, err)
	}
	defer nl.Close()
	lk, err := nl.LinkByIndex(v.peer)
	if err != nil {
		return nil, fmt.Errorf("peer of %s: %w", v.name, err)
	}
	list, err := nl.AddrList(lk, netlink.FAMILY_ALL)
	if errors.Is(err, netlink.ErrDumpInterrupted) {
		list, err = nl.AddrList(lk, netlink.FAMILY_ALL) // changed while read: once more
	}
	if err != nil {
		return nil, fmt.Errorf("addresses of the peer of %s: %w", v.name, err)
	}
	var out []netip.Addr
	for _, a := range list {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsGlobalUnicast() && !ip.IsLinkLocalUnicast() {
			out = append(out, ip)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// scanNamespaces finds the network namespaces that have an id in the node's
// namespace: those `ip netns` named, then those of processes (the oldest
// process of each).
func (t *Tracer) scanNamespaces(nodeNS uint64) map[int]peerNS {
	out := map[int]peerNS{}
	seen := map[uint64]bool{nodeNS: true}
	try := func(path string, name func() string) {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil || seen[st.Ino] {
			return
		}
		seen[st.Ino] = true
		h, err := netns.GetFromPath(path)
		if err != nil {
			return
		}
		id, err := t.ns.nl.GetNetNsIdByFd(int(h))
		h.Close()
		if err != nil || id < 0 {
			return
		}
		out[id] = peerNS{ino: st.Ino, path: path, name: name()}
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			try(filepath.Join("/run/netns", e.Name()), func() string { return e.Name() })
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	var pids []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	for _, pid := range pids {
		try(fmt.Sprintf("/proc/%d/ns/net", pid), func() string { return processWorkload(pid) })
	}
	return out
}

// processWorkload names the workload of a process after its container or
// its cgroup ("" when neither says anything).
func processWorkload(pid int) string {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		path, ok := strings.CutPrefix(sc.Text(), "0::")
		if !ok {
			continue
		}
		return cgroupWorkload(path)
	}
	return ""
}

// cgroupWorkload names a workload after a cgroup v2 path: the first 12 hex
// digits of the innermost container ID in it, else its last element without
// .scope or .service ("" for the root).
func cgroupWorkload(path string) string {
	var last, id string
	for _, el := range strings.Split(path, "/") {
		if el == "" {
			continue
		}
		last = el
		if c := containerIDIn(el); c != "" {
			id = c
		}
	}
	if id != "" {
		return id[:12]
	}
	for _, suffix := range []string{".scope", ".service"} {
		last = strings.TrimSuffix(last, suffix)
	}
	return last
}

// containerIDIn recognises a cgroup path element naming a container:
// "<runtime>-<64 hex>.scope" (systemd driver: cri-containerd, crio, docker,
// libpod) or a bare 64-hex-digit name (cgroupfs driver).
func containerIDIn(el string) string {
	s := strings.TrimSuffix(el, ".scope")
	if i := strings.LastIndexByte(s, '-'); i >= 0 && s != el {
		switch s[:i] {
		case "cri-containerd", "crio", "docker", "libpod":
			s = s[i+1:]
		default:
			return ""
		}
	}
	if len(s) != 64 {
		return ""
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return ""
		}
	}
	return s
}
