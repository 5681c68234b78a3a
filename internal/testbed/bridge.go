package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Topology is how a Node connects its pods.
type Topology int

const (
	// Bridged pods share a Linux bridge in the node (an L2 segment, like
	// flannel's or kubenet's cni0): pod-to-pod traffic is switched.
	Bridged Topology = iota + 1
	// Routed pods each have a point-to-point veth with a /32 (/128)
	// address and a default route to a link-local gateway the node
	// answers for (proxy ARP), like Calico: pod-to-pod traffic is routed
	// by the node.
	Routed
)

func (t Topology) String() string {
	switch t {
	case Bridged:
		return "bridged"
	case Routed:
		return "routed"
	}
	return fmt.Sprintf("topology-%d", int(t))
}

// Node is a network namespace playing a Kubernetes node: pods (network
// namespaces) hang off it through veth pairs whose node-side ends live in
// it, and its uplink "NIC" (a veth) leads to another namespace, Outside,
// playing the network beyond the node, which routes the pod subnets back to
// the node. The node's default route goes through the NIC. Nothing is
// created in the test process's own namespace.
type Node struct {
	NS *Netns
	// Topology says how pods are connected.
	Topology Topology
	// Bridge is the bridge's name in NS (Bridged).
	Bridge string
	// NIC is the name of the node's uplink in NS.
	NIC string
	// Outside is the namespace beyond the NIC; OutsideIP and OutsideIP6
	// are its addresses, reachable from every pod.
	Outside               *Netns
	OutsideIP, OutsideIP6 netip.Addr
	// NodeIP and NodeIP6 are the node's addresses on the NIC.
	NodeIP, NodeIP6 netip.Addr

	pods int
}

// Pod is a network namespace attached to a Node.
type Pod struct {
	Name string
	NS   *Netns
	// IP and IP6 are the pod's addresses (on its eth0).
	IP, IP6 netip.Addr
	// HostVeth is the node-side end of the pod's veth (in Node.NS).
	HostVeth string
}

// Address plan of the node helpers (only inside the tests' namespaces):
// 10.201.20.0/24 bridged pods, 10.201.21.0/24 routed pods, 10.201.22.0/24
// the uplink; IPv6 likewise in fd00:c10:20::/64 .. fd00:c10:22::/64.
var (
	bridgeNet4 = netip.MustParsePrefix("10.201.20.0/24")
	bridgeNet6 = netip.MustParsePrefix("fd00:c10:20::/64")
	routedNet4 = netip.MustParsePrefix("10.201.21.0/24")
	routedNet6 = netip.MustParsePrefix("fd00:c10:21::/64")
	uplinkNet4 = netip.MustParsePrefix("10.201.22.0/24")
	uplinkNet6 = netip.MustParsePrefix("fd00:c10:22::/64")
)

// nth returns the n-th address of a prefix.
func nth(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().As16()
	v := n
	for i := 15; i >= 0 && v > 0; i-- {
		s := int(b[i]) + v
		b[i] = byte(s)
		v = s >> 8
	}
	a := netip.AddrFrom16(b)
	if p.Addr().Is4() {
		a = a.Unmap()
	}
	return a
}

// NewNode builds a node namespace with the given topology, its uplink and
// the Outside namespace. Everything goes when the test ends.
func NewNode(t testing.TB, topo Topology) *Node {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "ip")
	n := &Node{
		NS:         NewNetns(t, "node"),
		Topology:   topo,
		Outside:    NewNetns(t, "outside"),
		NodeIP:     nth(uplinkNet4, 1),
		NodeIP6:    nth(uplinkNet6, 1),
		OutsideIP:  nth(uplinkNet4, 2),
		OutsideIP6: nth(uplinkNet6, 2),
	}
	sysctl(t, n.NS, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	// The uplink: eth-like names are per namespace, so plain ones do.
	n.NIC = "nic0"
	ipIn(t, nil, "link", "add", "name", n.NIC, "netns", n.NS.Name, "type", "veth",
		"peer", "name", "eth0", "netns", n.Outside.Name)
	addrUp(t, n.NS, n.NIC, netip.PrefixFrom(n.NodeIP, 24), netip.PrefixFrom(n.NodeIP6, 64))
	addrUp(t, n.Outside, "eth0", netip.PrefixFrom(n.OutsideIP, 24), netip.PrefixFrom(n.OutsideIP6, 64))
	n.NS.IP(t, "route", "add", "default", "via", n.OutsideIP.String())
	n.NS.IP(t, "-6", "route", "add", "default", "via", n.OutsideIP6.String())
	for _, p := range []netip.Prefix{bridgeNet4, routedNet4} {
		n.Outside.IP(t, "route", "add", p.String(), "via", n.NodeIP.String())
	}
	for _, p := range []netip.Prefix{bridgeNet6, routedNet6} {
		n.Outside.IP(t, "-6", "route", "add", p.String(), "via", n.NodeIP6.String())
	}
	if topo == Bridged {
		n.Bridge = "br0"
		n.NS.IP(t, "link", "add", n.Bridge, "type", "bridge")
		// No STP delays; forward at once.
		n.NS.IP(t, "link", "set", n.Bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
		addrUp(t, n.NS, n.Bridge, netip.PrefixFrom(nth(bridgeNet4, 1), 24), netip.PrefixFrom(nth(bridgeNet6, 1), 64))
	}
	return n
}

// AddPod makes a pod namespace and connects it to the node. Its node-side
// veth is named clvp<random> (each in the node's namespace).
func (n *Node) AddPod(t testing.TB, name string) *Pod {
	t.Helper()
	return n.AddPodAt(t, name, 0)
}

// AddPodAt is AddPod with the node-side veth at interface index hostIndex
// (0: any), as on a node where many interfaces came and went.
func (n *Node) AddPodAt(t testing.TB, name string, hostIndex int) *Pod {
	t.Helper()
	n.pods++
	idx := 10 + n.pods
	p := &Pod{Name: name, NS: NewNetns(t, "pod-"+name), HostVeth: "clvp" + randSuffix(8)}
	args := []string{"link", "add", "name", p.HostVeth, "netns", n.NS.Name}
	if hostIndex != 0 {
		args = append(args, "index", strconv.Itoa(hostIndex))
	}
	ipIn(t, nil, append(args, "type", "veth", "peer", "name", "eth0", "netns", p.NS.Name)...)
	switch n.Topology {
	case Bridged:
		p.IP, p.IP6 = nth(bridgeNet4, idx), nth(bridgeNet6, idx)
		n.NS.IP(t, "link", "set", p.HostVeth, "master", n.Bridge)
		n.NS.IP(t, "link", "set", p.HostVeth, "up")
		addrUp(t, p.NS, "eth0", netip.PrefixFrom(p.IP, 24), netip.PrefixFrom(p.IP6, 64))
		p.NS.IP(t, "route", "add", "default", "via", nth(bridgeNet4, 1).String())
		p.NS.IP(t, "-6", "route", "add", "default", "via", nth(bridgeNet6, 1).String())
	case Routed:
		p.IP, p.IP6 = nth(routedNet4, idx), nth(routedNet6, idx)
		// The node answers for the pod's gateway on the veth, at once
		// (as Calico sets it: by default a proxy ARP answer waits up
		// to 0.8 s, which can make a pod's first SYN go twice).
		sysctl(t, n.NS, "net.ipv4.conf."+p.HostVeth+".proxy_arp=1", "net.ipv4.neigh."+p.HostVeth+".proxy_delay=0")
		n.NS.IP(t, "link", "set", p.HostVeth, "up")
		n.NS.IP(t, "addr", "add", "fe80::1/64", "dev", p.HostVeth, "nodad")
		n.NS.IP(t, "route", "add", p.IP.String()+"/32", "dev", p.HostVeth, "scope", "link")
		n.NS.IP(t, "-6", "route", "add", p.IP6.String()+"/128", "dev", p.HostVeth)
		addrUp(t, p.NS, "eth0", netip.PrefixFrom(p.IP, 32), netip.PrefixFrom(p.IP6, 128))
		p.NS.IP(t, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		p.NS.IP(t, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
		p.NS.IP(t, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
	default:
		t.Fatalf("AddPod: topology %v", n.Topology)
	}
	return p
}

// addrUp gives an interface its addresses and sets it up.
func addrUp(t testing.TB, ns *Netns, dev string, addrs ...netip.Prefix) {
	t.Helper()
	for _, a := range addrs {
		args := []string{"addr", "add", a.String(), "dev", dev}
		if a.Addr().Is6() {
			args = append(args, "nodad")
		}
		ipIn(t, ns, args...)
	}
	ipIn(t, ns, "link", "set", dev, "up")
}

// sysctl sets kernel parameters inside a namespace.
func sysctl(t testing.TB, ns *Netns, settings ...string) {
	t.Helper()
	for _, s := range settings {
		out, err := exec.Command("ip", "netns", "exec", ns.Name, "sysctl", "-q", "-w", s).CombinedOutput()
		if err != nil {
			t.Fatalf("sysctl %s in %s: %v: %s", s, ns.Name, err, out)
		}
	}
}

// Exec runs a program in the namespace, waits for it and returns its
// standard output; it fails the test if the program does.
func (ns *Netns) Exec(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := ns.Command(ctx, name, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s in %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), ns.Name, err, out.String(), errb.String())
	}
	return out.String()
}

// Server is a long-running program started in a namespace, stopped when the
// test ends.
type Server struct {
	Cmd *exec.Cmd
	// Dir is a temporary directory for the server's files.
	Dir string
}

// StartNginx runs nginx (one worker, keep-alive up to 1000 requests) in a
// namespace, listening on port at each address, serving root, with
// /echo answering "echo\n"; it waits until the first address accepts
// connections.
func StartNginx(t testing.TB, ns *Netns, port uint16, root string, addrs ...netip.Addr) *Server {
	t.Helper()
	return startNginx(t, nginxConfig{ns: ns, port: port, root: root, addrs: addrs, sendfile: true})
}

// StartNginxInCgroup is StartNginx with nginx in cgroup cg, and sending
// its responses with write calls (no sendfile), so that a socket tracer of
// the cgroup sees their bytes.
func StartNginxInCgroup(t testing.TB, ns *Netns, cg *Cgroup, port uint16, root string, addrs ...netip.Addr) *Server {
	t.Helper()
	return startNginx(t, nginxConfig{ns: ns, cgroup: cg, port: port, root: root, addrs: addrs})
}

// StartNginxTLS is StartNginx serving HTTPS with the certificate and key
// in the given PEM files.
func StartNginxTLS(t testing.TB, ns *Netns, port uint16, root, certFile, keyFile string, addrs ...netip.Addr) *Server {
	t.Helper()
	return startNginx(t, nginxConfig{ns: ns, port: port, root: root, addrs: addrs, sendfile: true,
		certFile: certFile, keyFile: keyFile})
}

// StartIperf3 runs an iperf3 server in a namespace on addr:port (one test
// at a time) and waits until it listens.
func StartIperf3(t testing.TB, ns *Netns, addr netip.Addr, port uint16) *Server {
	t.Helper()
	iperf := RequireTool(t, "iperf3")
	dir := t.TempDir()
	log := filepath.Join(dir, "iperf3.log")
	s := startServer(t, ns, nil, dir, iperf, "-s", "-B", addr.String(), "-p", fmt.Sprint(port), "--logfile", log)
	waitListening(t, ns, netip.AddrPortFrom(addr, port), log)
	return s
}

// startServer runs a server program in ns (and in cg, if not nil) until
// the test ends.
func startServer(t testing.TB, ns *Netns, cg *Cgroup, dir, name string, args ...string) *Server {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := ns.Command(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	start := cmd.Start
	if cg != nil {
		start = func() error { return cg.Start(cmd) }
	}
	if err := start(); err != nil {
		cancel()
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	return &Server{Cmd: cmd, Dir: dir}
}

// waitListening waits until addr accepts TCP connections from inside ns
// (bash's /dev/tcp, so that nothing but a SYN/ACK/FIN exchange is made).
func waitListening(t testing.TB, ns *Netns, addr netip.AddrPort, log string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	host := addr.Addr().String()
	for {
		err := ns.Command(context.Background(), "bash", "-c",
			fmt.Sprintf("exec 3<>/dev/tcp/%s/%d", host, addr.Port())).Run()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(log)
			t.Fatalf("nothing listening on %s in %s after 10 s: %v\n%s", addr, ns.Name, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
