package tcsessions

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/spans"
)

// Service addresses of the hairpin test: a ClusterIP-like address the node
// translates (only inside the tests' namespaces).
var (
	hairpinService4 = netip.MustParseAddr("10.96.0.10")
	hairpinService6 = netip.MustParseAddr("fd00:c10:96::10")
)

// hairpinRules is an nftables ruleset for the node that does what
// kube-proxy does for a Service whose one endpoint is the pod itself:
// DNAT of the Service address, port 80, to the pod's port 8080, and SNAT
// (kube-proxy's masquerade, here to a fixed address) of the traffic whose
// source is the endpoint it goes to, so that the pod's answers come back
// through the node.
func hairpinRules(pod *testbed.Pod, node *testbed.Node) string {
	return fmt.Sprintf(`table inet clvhairpin {
	chain pre {
		type nat hook prerouting priority dstnat;
		ip daddr %[1]s tcp dport 80 dnat ip to %[3]s:8080
		ip6 daddr %[2]s tcp dport 80 dnat ip6 to [%[4]s]:8080
	}
	chain post {
		type nat hook postrouting priority srcnat;
		ip saddr %[3]s ip daddr %[3]s tcp dport 8080 snat ip to %[5]s
		ip6 saddr %[4]s ip6 daddr %[4]s tcp dport 8080 snat ip6 to %[6]s
	}
}
`, hairpinService4, hairpinService6, pod.IP, pod.IP6, node.NodeIP, node.NodeIP6)
}

// TestHairpinService: a pod reaches itself through a Service address that
// the node translates back to it (DNAT, then SNAT, as kube-proxy does), so
// every packet crosses the pod's veth twice: at the host side's ingress
// before translation (the pod as client, to the Service) and at its egress
// after (the pod as server, from the node's address), and the answers the
// other way round. The packet comes in and goes out on the very same
// interface (routed by the node; or switched back by the bridge, which
// translates it first), so skb->ingress_ifindex equals the interface at
// the egress hook too: only the hook itself tells the two connections'
// sides apart. Each connection gives one record per exchange, with the
// side its first packet's hook says (client at ingress, server at egress),
// curl's byte counts, the HTTP transaction, the same first request
// sequence number on both (NAT keeps it: the spans join one trace), and
// the translated request's time not before the original's, its response's
// not after (equal when both carry the sender's stamp).
func TestHairpinService(t *testing.T) {
	forEachSetup(t, func(t *testing.T, topo testbed.Topology, mode string) {
		testbed.RequireTool(t, "nft")
		node := testbed.NewNode(t, topo)
		pod := node.AddPod(t, "self")
		if topo == testbed.Bridged {
			// The bridge hands a pod's packet to netfilter before it
			// switches it (br_netfilter), so a translated packet for
			// the same pod is sent back out of the port it came in by:
			// only with hairpin mode on that port, as kubelet and
			// bridge CNIs set it.
			node.NS.IP(t, "link", "set", pod.HostVeth, "type", "bridge_slave", "hairpin", "on")
		}
		rules := filepath.Join(t.TempDir(), "hairpin.nft")
		if err := os.WriteFile(rules, []byte(hairpinRules(pod, node)), 0o644); err != nil {
			t.Fatal(err)
		}
		node.NS.Exec(t, "nft", "-f", rules)
		root := t.TempDir()
		randomFile(t, root, "small.txt", 321)
		randomFile(t, root, "big.bin", 200000)
		testbed.StartNginx(t, pod.NS, 8080, root, pod.IP, pod.IP6)
		c := startCollector(t, node, Config{Ports: []Port{{Port: 80, Protocol: "http"}, {Port: 8080, Protocol: "http"}}, Attach: mode})

		paths := []string{"/small.txt", "/big.bin"}
		for _, fam := range []struct {
			svc, pod, node netip.Addr
		}{{hairpinService4, pod.IP, node.NodeIP}, {hairpinService6, pod.IP6, node.NodeIP6}} {
			base := "http://" + netip.AddrPortFrom(fam.svc, 80).String()
			res := curl(t, pod.NS, base+paths[0], base+paths[1])
			if res[0].connects != 1 || res[1].connects != 0 {
				t.Fatalf("%v: curl made %d+%d connections, want one keep-alive connection", fam.svc, res[0].connects, res[1].connects)
			}
			// orig: the pod's own connection to the Service; xlat: the
			// one the node made of it, to the pod's port 8080.
			orig := c.wait(t, 2, 10*time.Second, toServer(netip.AddrPortFrom(fam.svc, 80)))
			xlat := c.wait(t, 2, 10*time.Second, toServer(netip.AddrPortFrom(fam.pod, 8080)))
			for i := range paths {
				o, x := orig[i], xlat[i]
				for _, side := range []struct {
					name   string
					x      *Exchange
					client netip.Addr
					kind   spans.Kind
				}{{"original", o, fam.pod, spans.Client}, {"translated", x, fam.node, spans.Server}} {
					e := side.x
					if e.Interface != pod.HostVeth || e.Role != RolePod || e.Index != i || e.Client.Addr() != side.client {
						t.Errorf("%v %s #%d: %s", fam.svc, side.name, i, e)
					}
					if e.Request.NewBytes != uint64(res[i].request) || e.Response.NewBytes != uint64(res[i].header+res[i].download) {
						t.Errorf("%v %s #%d: request %d response %d bytes, curl says %d and %d+%d", fam.svc, side.name, i,
							e.Request.NewBytes, e.Response.NewBytes, res[i].request, res[i].header, res[i].download)
					}
					if e.Tx == nil || attrOf(e, "url.path").AsString() != paths[i] || e.Tx.StatusCode != 200 {
						t.Errorf("%v %s #%d: HTTP %s", fam.svc, side.name, i, e)
					}
					if e.seenFrom() != "syn" || e.RolesGuessed() || e.HandshakeRTT() <= 0 {
						t.Errorf("%v %s #%d: seen from %s, roles guessed %v, handshake %v", fam.svc, side.name, i,
							e.seenFrom(), e.RolesGuessed(), e.HandshakeRTT())
					}
					s := e.Session()
					if s.Kind != side.kind || s.Point != spans.PointPodVeth || s.Wire.Workload != pod.NS.Name {
						t.Errorf("%v %s #%d: kind %v point %v workload %q, want kind %v", fam.svc, side.name, i,
							s.Kind, s.Point, s.Wire.Workload, side.kind)
					}
				}
				// The same packets, before and after translation.
				if !sameWireCounts(o, x) {
					t.Errorf("%v #%d: original %+v/%+v, translated %+v/%+v", fam.svc, i, o.Request, o.Response, x.Request, x.Response)
				}
				if o.ReqSeq0 == 0 || o.ReqSeq0 != x.ReqSeq0 || o.Session().ConnTag != x.Session().ConnTag {
					t.Errorf("%v #%d: first request byte %#x original, %#x translated", fam.svc, i, o.ReqSeq0, x.ReqSeq0)
				}
				// A request reaches the pod's egress after it left its
				// ingress; the answer leaves the pod (ingress) before it
				// comes back to the client (egress).
				if !(o.ReqFirst <= x.ReqFirst && x.RespFirst <= o.RespFirst) {
					t.Errorf("%v #%d: request first %d/%d, response first %d/%d (original/translated)", fam.svc, i,
						o.ReqFirst, x.ReqFirst, o.RespFirst, x.RespFirst)
				}
			}
		}
		time.Sleep(2 * PollInterval)
		if n := len(c.wait(t, 0, 0, onIface(node.NIC))); n != 0 {
			t.Errorf("%d exchanges on the node NIC for traffic that stays on the node", n)
		}
		if n := len(c.matching(onIface(pod.HostVeth))); n != 8 {
			t.Errorf("%d exchanges on the pod's veth, want 8", n)
		}
		st, err := c.tr.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if st.ExchangesLost+st.PayloadsLost+st.PayloadFaults+st.HeaderFaults+st.SessionsFull+st.StateRaces+st.KeyCollisions != 0 {
			t.Errorf("losses: %+v", st)
		}
		// Two connections per family, each closed by FIN.
		if st.SessionsCreated != 4 || st.SessionsClosed != 4 {
			t.Errorf("sessions created %d closed %d, want 4 and 4", st.SessionsCreated, st.SessionsClosed)
		}
	})
}
