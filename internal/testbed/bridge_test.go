package testbed

import (
	"strings"
	"testing"
)

// TestNodeTopologies: in both topologies, pods reach each other and the
// outside over IPv4 and IPv6, and the node's default route is its NIC.
func TestNodeTopologies(t *testing.T) {
	RequireRoot(t)
	RequireTool(t, "ping")
	for _, topo := range []Topology{Bridged, Routed} {
		t.Run(topo.String(), func(t *testing.T) {
			n := NewNode(t, topo)
			a, b := n.AddPod(t, "a"), n.AddPod(t, "b")
			for _, dst := range []string{b.IP.String(), b.IP6.String(), n.OutsideIP.String(), n.OutsideIP6.String()} {
				a.NS.Exec(t, "ping", "-c", "1", "-W", "5", dst)
			}
			n.Outside.Exec(t, "ping", "-c", "1", "-W", "5", a.IP.String())
			n.Outside.Exec(t, "ping", "-c", "1", "-W", "5", b.IP6.String())
			if out := n.NS.Exec(t, "ip", "route", "show", "default"); !strings.Contains(out, "dev "+n.NIC) {
				t.Errorf("default route: %s", out)
			}
			if out := n.NS.Exec(t, "ip", "-o", "link", "show", "type", "veth"); !strings.Contains(out, a.HostVeth) ||
				!strings.Contains(out, b.HostVeth) || !strings.Contains(out, "link-netns") {
				t.Errorf("node veths: %s", out)
			}
		})
	}
}
