package tcsessions

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"

	"github.com/clovisor/clovisor/internal/testbed"
	"github.com/clovisor/clovisor/spans"
)

// The tests in this file run real traffic between network namespaces
// playing pods on a node namespace (see testbed.NewNode), in both
// topologies and both attach modes, with the tracer working in the node's
// namespace as an agent does in the host's.

var topologies = []testbed.Topology{testbed.Bridged, testbed.Routed}

var attachModes = []string{AttachTCX, AttachClsact}

// forEachSetup runs fn for every topology and attach mode.
func forEachSetup(t *testing.T, fn func(t *testing.T, topo testbed.Topology, mode string)) {
	for _, topo := range topologies {
		for _, mode := range attachModes {
			t.Run(topo.String()+"/"+mode, func(t *testing.T) { fn(t, topo, mode) })
		}
	}
}

// curlTransfer is what curl's --write-out reports of one transfer.
type curlTransfer struct {
	request, header, download int
	code                      int
	connects                  int
}

// curl runs curl in ns over one keep-alive connection for all urls and
// returns its report per transfer.
func curl(t *testing.T, ns *testbed.Netns, urls ...string) []curlTransfer {
	t.Helper()
	testbed.RequireTool(t, "curl")
	args := []string{"-sS", "--http1.1", "-g", "-w", "%{size_request} %{size_header} %{size_download} %{response_code} %{num_connects}\\n"}
	for _, u := range urls {
		args = append(args, "-o", "/dev/null", u)
	}
	out := ns.Exec(t, "curl", args...)
	var res []curlTransfer
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var c curlTransfer
		if _, err := fmt.Sscan(line, &c.request, &c.header, &c.download, &c.code, &c.connects); err != nil {
			t.Fatalf("curl output %q: %v", line, err)
		}
		res = append(res, c)
	}
	if len(res) != len(urls) {
		t.Fatalf("curl reported %d transfers, want %d: %s", len(res), len(urls), out)
	}
	return res
}

// sameWireCounts reports whether two records of one exchange, seen at two
// hooks, counted the same packets and bytes each way (retransmissions
// aside: a packet lost between the hooks is sent again past the first).
func sameWireCounts(a, b *Exchange) bool {
	ra, rb, pa, pb := a.Request, b.Request, a.Response, b.Response
	ra.RetransPackets, rb.RetransPackets, pa.RetransPackets, pb.RetransPackets = 0, 0, 0, 0
	return ra == rb && pa == pb
}

func attrOf(x *Exchange, k string) attribute.Value {
	if x.Tx == nil {
		return attribute.Value{}
	}
	for _, kv := range x.Tx.AllAttrs() {
		if string(kv.Key) == k {
			return kv.Value
		}
	}
	return attribute.Value{}
}

func randomFile(t *testing.T, dir, name string, size int) []byte {
	t.Helper()
	b := make([]byte, size)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestHTTPKeepAliveExchanges: curl makes four requests over one keep-alive
// connection (and one more over IPv6) from a client pod to nginx in a
// server pod. Each veth gives exactly one record per exchange, in order,
// whose byte counts are curl's own (request size; header plus body size),
// with the HTTP attributes read from the wire; pod-to-pod traffic never
// reaches the node NIC.
func TestHTTPKeepAliveExchanges(t *testing.T) {
	forEachSetup(t, func(t *testing.T, topo testbed.Topology, mode string) {
		node := testbed.NewNode(t, topo)
		cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
		root := t.TempDir()
		randomFile(t, root, "small.txt", 123)
		randomFile(t, root, "big.bin", 300000)
		testbed.StartNginx(t, srv.NS, 8080, root, srv.IP, srv.IP6)
		c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}, Attach: mode})
		if got := c.tr.Mode(); got != mode {
			t.Fatalf("mode %s, want %s", got, mode)
		}

		base := "http://" + netip.AddrPortFrom(srv.IP, 8080).String()
		paths := []string{"/small.txt", "/big.bin", "/missing", "/echo"}
		var urls []string
		for _, p := range paths {
			urls = append(urls, base+p)
		}
		res := curl(t, cli.NS, urls...)
		res6 := curl(t, cli.NS, "http://"+netip.AddrPortFrom(srv.IP6, 8080).String()+"/small.txt")
		for i, r := range res {
			if want := map[bool]int{true: 1, false: 0}[i == 0]; r.connects != want {
				t.Fatalf("curl made %d connections for transfer %d: not one keep-alive connection", r.connects, i)
			}
		}

		srv4 := netip.AddrPortFrom(srv.IP, 8080)
		srv6 := netip.AddrPortFrom(srv.IP6, 8080)
		wantCodes := []int64{200, 200, 404, 200}
		for _, veth := range []string{cli.HostVeth, srv.HostVeth} {
			xs := c.wait(t, 4, 10*time.Second, and(onIface(veth), toServer(srv4)))
			for i, x := range xs {
				r := res[i]
				if x.Index != i || x.Role != RolePod || x.Client.Addr() != cli.IP || x.Protocol != "http" {
					t.Errorf("%s #%d: %s", veth, i, x)
				}
				wantEnd := EndNextRequest
				if i == len(xs)-1 {
					wantEnd = EndFIN
				}
				if x.End != wantEnd || x.Phase != PhaseResponse {
					t.Errorf("%s #%d: end %v phase %d, want %v", veth, i, x.End, x.Phase, wantEnd)
				}
				if x.Request.NewBytes != uint64(r.request) || x.Response.NewBytes != uint64(r.header+r.download) {
					t.Errorf("%s #%d: request %d response %d bytes on the wire, curl says %d and %d+%d",
						veth, i, x.Request.NewBytes, x.Response.NewBytes, r.request, r.header, r.download)
				}
				if x.Request.PayloadBytes < x.Request.NewBytes || x.Request.Packets == 0 || x.Response.Packets == 0 ||
					x.Request.Bytes <= x.Request.PayloadBytes || x.Response.Bytes <= x.Response.PayloadBytes {
					t.Errorf("%s #%d: counts %+v / %+v", veth, i, x.Request, x.Response)
				}
				if x.Tx == nil || x.Tx.Truncated {
					t.Fatalf("%s #%d: no complete HTTP transaction: %s", veth, i, x)
				}
				if attrOf(x, "http.request.method").AsString() != "GET" || attrOf(x, "url.path").AsString() != paths[i] ||
					attrOf(x, "http.response.status_code").AsInt64() != wantCodes[i] || x.Tx.StatusCode != r.code {
					t.Errorf("%s #%d: HTTP %v", veth, i, x.Tx.AllAttrs())
				}
				if x.Tx.ReqBytes != int64(r.request) || x.Tx.RespBytes != int64(r.header+r.download) {
					t.Errorf("%s #%d: transaction sizes %d/%d", veth, i, x.Tx.ReqBytes, x.Tx.RespBytes)
				}
				if !(x.ReqFirst > 0 && x.ReqFirst <= x.ReqLast && x.ReqLast < x.RespFirst && x.RespFirst <= x.RespLast && x.RespLast <= x.EndTS) {
					t.Errorf("%s #%d: times %d %d %d %d %d", veth, i, x.ReqFirst, x.ReqLast, x.RespFirst, x.RespLast, x.EndTS)
				}
				if i > 0 && x.ReqFirst <= xs[i-1].RespLast {
					t.Errorf("%s #%d begins before #%d ended", veth, i, i-1)
				}
				if x.Request.Flags&(fPSH|fACK) != fPSH|fACK || (i == 0) != (x.Request.Flags&fSYN != 0) ||
					(i == 3) != (x.Request.Flags&fFIN != 0) || (i == 3) != (x.Response.Flags&fFIN != 0) {
					t.Errorf("%s #%d: flags %#x / %#x", veth, i, x.Request.Flags, x.Response.Flags)
				}
				if x.HandshakeRTT() <= 0 || x.seenFrom() != "syn" || x.RolesGuessed() {
					t.Errorf("%s #%d: handshake %v seen from %s", veth, i, x.HandshakeRTT(), x.seenFrom())
				}
				s := x.Session()
				if s.Point != spans.PointPodVeth || s.Wire.Interface != veth || s.Tx != x.Tx || s.Index != i {
					t.Errorf("%s #%d: session %+v", veth, i, s)
				}
				// The pod behind the veth and the side it plays; the
				// first request byte, as both ends' sockets see it.
				wantKind, wantWorkload := spans.Server, srv.NS.Name
				if veth == cli.HostVeth {
					wantKind, wantWorkload = spans.Client, cli.NS.Name
				}
				if s.Kind != wantKind || s.Wire.Workload != wantWorkload || s.ConnTag != ConnTag(xs[0].ReqSeq0) || xs[0].ReqSeq0 == 0 {
					t.Errorf("%s #%d: kind %v workload %q conn tag %#x", veth, i, s.Kind, s.Wire.Workload, s.ConnTag)
				}
			}
			x6 := c.wait(t, 1, 10*time.Second, and(onIface(veth), toServer(srv6)))[0]
			if x6.Request.NewBytes != uint64(res6[0].request) || x6.Response.NewBytes != uint64(res6[0].header+res6[0].download) ||
				x6.End != EndFIN || attrOf(x6, "url.path").AsString() != "/small.txt" {
				t.Errorf("%s IPv6: %s", veth, x6)
			}
		}
		// Both veths saw the same packets.
		a := c.wait(t, 5, time.Second, onIface(cli.HostVeth))
		b := c.wait(t, 5, time.Second, onIface(srv.HostVeth))
		for i := range a {
			if !sameWireCounts(a[i], b[i]) || a[i].ReqSeq0 != b[i].ReqSeq0 {
				t.Errorf("#%d: client veth %+v/%+v, server veth %+v/%+v", i, a[i].Request, a[i].Response, b[i].Request, b[i].Response)
			}
		}
		time.Sleep(2 * PollInterval)
		if n := len(c.wait(t, 0, 0, onIface(node.NIC))); n != 0 {
			t.Errorf("%d exchanges on the node NIC for pod-to-pod traffic", n)
		}
		st, err := c.tr.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if st.ExchangesLost+st.PayloadsLost+st.PayloadFaults+st.HeaderFaults+st.SessionsFull+st.StateRaces != 0 {
			t.Errorf("losses: %+v", st)
		}
		// Two connections on two veths, each closed by FIN.
		if st.SessionsCreated != 4 || st.SessionsClosed != 4 {
			t.Errorf("sessions created %d closed %d, want 4 and 4", st.SessionsCreated, st.SessionsClosed)
		}
		c.close(t) // the Assembler is the reader's until then
		if as := c.asm.Stats(); as.Parsed != 10 || as.Orphans != 0 || as.BadEvents != 0 || as.Pipelined != 0 || c.asm.Conns() != 0 {
			t.Errorf("assembler %+v conns %d", as, c.asm.Conns())
		}
	})
}

// iperfResult is the part of iperf3's JSON report the tests compare.
type iperfResult struct {
	End struct {
		SumSent struct {
			Bytes uint64 `json:"bytes"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes uint64 `json:"bytes"`
		} `json:"sum_received"`
	} `json:"end"`
}

// iperfCookie is the size of the cookie an iperf3 client sends first on
// each data connection.
const iperfCookie = 37

// TestIperf3BytesMatch: bulk transfers with iperf3 in both directions
// (rate-limited to 2 Gbit/s so that the receiver keeps up); the data
// connection's record carries exactly the bytes iperf3 reports sent, plus
// its 37-byte cookie, on both veths, however many packets were
// retransmitted or reordered. A run whose data connection ends with RST
// (the server closed it with data unread, so no iperf3 figure is what
// crossed the wire) is repeated.
func TestIperf3BytesMatch(t *testing.T) {
	forEachSetup(t, func(t *testing.T, topo testbed.Topology, mode string) {
		node := testbed.NewNode(t, topo)
		cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
		testbed.StartIperf3(t, srv.NS, srv.IP, 5201)
		c := startCollector(t, node, Config{Ports: []Port{{Port: 5201}}, Attach: mode})
		for _, reverse := range []bool{false, true} {
			// A run whose data connection ends with RST (the server
			// closed it before reading everything: then neither
			// iperf3 count is what crossed the wire) is repeated.
			for attempt := 1; ; attempt++ {
				if iperfRun(t, c, cli, srv, reverse, attempt == 3) {
					break
				}
				t.Logf("reverse=%v: the data connection ended with RST, again", reverse)
			}
		}
		if st, _ := c.tr.Stats(); st.ExchangesLost+st.PayloadsLost+st.SessionsFull != 0 {
			t.Errorf("losses: %+v", st)
		}
	})
}

// iperfRun runs one iperf3 test and checks the data connection's record. It
// returns false when the connection ended with RST (unless last).
func iperfRun(t *testing.T, c *collector, cli, srv *testbed.Pod, reverse, last bool) bool {
	t.Helper()
	c.mu.Lock()
	c.xs = nil
	c.mu.Unlock()
	args := []string{"-c", srv.IP.String(), "-p", "5201", "-t", "1", "-b", "2G", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	var r iperfResult
	out := cli.NS.Exec(t, "iperf3", args...)
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("iperf3 JSON: %v\n%s", err, out)
	}
	// What the sender wrote: with a FIN at the end, all of it crossed
	// the wire (the receiver's count can stop early).
	want := r.End.SumSent.Bytes
	if want < 1<<20 {
		t.Fatalf("iperf3 sent %d bytes", want)
	}
	for _, veth := range []string{cli.HostVeth, srv.HostVeth} {
		// The data connection: the exchange carrying more than a
		// megabyte.
		data := c.wait(t, 1, 10*time.Second, and(onIface(veth), func(x *Exchange) bool {
			d := x.Request
			if reverse {
				d = x.Response
			}
			return d.NewBytes > 1<<20
		}))[0]
		if data.End == EndRST && !last {
			return false
		}
		up, down := data.Request.NewBytes, data.Response.NewBytes
		if reverse {
			if up != iperfCookie || down != want {
				t.Errorf("%s reverse: client sent %d, server %d bytes; iperf3 says %d (+%d cookie)", veth, up, down, want, iperfCookie)
			}
		} else if up != want+iperfCookie || down != 0 {
			t.Errorf("%s: client sent %d, server %d bytes; iperf3 says %d (+%d cookie)", veth, up, down, want, iperfCookie)
		}
		if data.End != EndFIN || data.Index != 0 {
			t.Errorf("%s: data connection %s", veth, data)
		}
		t.Logf("%s reverse=%v: %d bytes in %d+%d packets (%d retransmitted or reordered); iperf3 sent %d, received %d",
			veth, reverse, max(up, down), data.Request.Packets, data.Response.Packets,
			data.Request.RetransPackets+data.Response.RetransPackets, want, r.End.SumReceived.Bytes)
	}
	return true
}

// TestTransferUnchanged: a 16 MiB file downloaded through the traced veths
// has the same SHA-256 with and without the programs attached (tcx and
// clsact), and its record counts every byte.
func TestTransferUnchanged(t *testing.T) {
	testbed.RequireTool(t, "sha256sum")
	node := testbed.NewNode(t, testbed.Bridged)
	cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
	root := t.TempDir()
	const size = 16 << 20
	src := randomFile(t, root, "file.bin", size)
	sum := sha256.Sum256(src)
	want := hex.EncodeToString(sum[:])
	testbed.StartNginx(t, srv.NS, 8080, root, srv.IP)
	url := "http://" + netip.AddrPortFrom(srv.IP, 8080).String() + "/file.bin"
	download := func() string {
		out := cli.NS.Exec(t, "bash", "-c", "set -o pipefail; curl -sS --fail "+url+" | sha256sum")
		return strings.Fields(out)[0]
	}
	if got := download(); got != want {
		t.Fatalf("without tracing: sha256 %s, want %s", got, want)
	}
	for _, mode := range attachModes {
		c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}, Attach: mode})
		if got := download(); got != want {
			t.Errorf("%s: sha256 %s, want %s", mode, got, want)
		}
		x := c.wait(t, 1, 10*time.Second, onIface(srv.HostVeth))[0]
		if x.Tx == nil || x.Tx.StatusCode != 200 || attrOf(x, "http.response.body.size").AsInt64() != size ||
			x.Response.NewBytes != uint64(x.Tx.RespBytes) || x.Response.NewBytes <= size {
			t.Errorf("%s: %s", mode, x)
		}
		c.close(t)
	}
	if got := download(); got != want {
		t.Errorf("after detaching: sha256 %s, want %s", got, want)
	}
}

// pingBytes is the IP size of an ICMP echo with n bytes of data.
func pingBytes(v6 bool, n int) uint64 {
	if v6 {
		return uint64(40 + 8 + n)
	}
	return uint64(20 + 8 + n)
}

// TestNodeNIC: traffic between the outside and a pod crosses the node NIC,
// where it gives records with role node_nic and is counted for the pod's
// workload (exactly: pings of known size); pod-to-pod traffic counts for no
// workload.
func TestNodeNIC(t *testing.T) {
	testbed.RequireTool(t, "ping")
	for _, topo := range topologies {
		t.Run(topo.String(), func(t *testing.T) {
			node := testbed.NewNode(t, topo)
			cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
			root := t.TempDir()
			randomFile(t, root, "x.bin", 5000)
			testbed.StartNginx(t, srv.NS, 8080, root, srv.IP, srv.IP6)
			c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}})
			ifs := c.tr.Interfaces()
			roles := map[string]Role{}
			for _, i := range ifs {
				roles[i.Name] = i.Role
			}
			if len(ifs) != 3 || roles[node.NIC] != RoleNode || roles[cli.HostVeth] != RolePod || roles[srv.HostVeth] != RolePod {
				t.Fatalf("interfaces %+v", ifs)
			}
			if err := c.tr.SetWorkload("default/srv", srv.IP, srv.IP6); err != nil {
				t.Fatal(err)
			}
			if err := c.tr.SetWorkload("default/cli", cli.IP, cli.IP6); err != nil {
				t.Fatal(err)
			}

			res := curl(t, node.Outside, "http://"+netip.AddrPortFrom(srv.IP, 8080).String()+"/x.bin",
				"http://"+netip.AddrPortFrom(srv.IP, 8080).String()+"/echo")
			nic := c.wait(t, 2, 10*time.Second, onIface(node.NIC))
			pod := c.wait(t, 2, 10*time.Second, onIface(srv.HostVeth))
			for i := range nic {
				if nic[i].Role != RoleNode || nic[i].Client.Addr() != node.OutsideIP || nic[i].Server.Addr() != srv.IP ||
					nic[i].Request.NewBytes != uint64(res[i].request) || nic[i].Response.NewBytes != uint64(res[i].header+res[i].download) ||
					nic[i].Request.NewBytes != pod[i].Request.NewBytes || nic[i].Response.NewBytes != pod[i].Response.NewBytes {
					t.Errorf("#%d: NIC %s, pod %s", i, nic[i], pod[i])
				}
				if s := nic[i].Session(); s.Point != spans.PointNodeNIC || s.Wire.Interface != node.NIC {
					t.Errorf("#%d: session %+v", i, s)
				}
			}
			tr, err := c.tr.WorkloadTraffic()
			if err != nil {
				t.Fatal(err)
			}
			var rx, tx uint64
			for _, x := range nic {
				rx += x.Request.Bytes
				tx += x.Response.Bytes
			}
			// The last ACK after both FINs comes after the last record.
			if s := tr["default/srv"]; s.RxBytes < rx || s.RxBytes > rx+100 || s.TxBytes != tx {
				t.Errorf("srv traffic %+v, the NIC records say rx %d tx %d", s, rx, tx)
			}

			// Pings: exact counts, IPv4 and IPv6, both ways.
			before, _ := c.tr.WorkloadTraffic()
			node.Outside.Exec(t, "ping", "-c", "3", "-s", "100", "-i", "0.05", srv.IP.String())
			node.Outside.Exec(t, "ping", "-c", "2", "-s", "200", "-i", "0.05", srv.IP6.String())
			cli.NS.Exec(t, "ping", "-c", "2", "-s", "300", "-i", "0.05", node.OutsideIP.String())
			cli.NS.Exec(t, "ping", "-c", "4", "-s", "50", "-i", "0.05", srv.IP.String()) // pod to pod: no NIC
			after, _ := c.tr.WorkloadTraffic()
			d := func(name string) Traffic {
				a, b := after[name], before[name]
				return Traffic{a.RxBytes - b.RxBytes, a.RxPackets - b.RxPackets, a.TxBytes - b.TxBytes, a.TxPackets - b.TxPackets}
			}
			wantSrv := 3*pingBytes(false, 100) + 2*pingBytes(true, 200)
			if got := d("default/srv"); got != (Traffic{wantSrv, 5, wantSrv, 5}) {
				t.Errorf("srv pings: %+v, want %d bytes and 5 packets each way", got, wantSrv)
			}
			wantCli := 2 * pingBytes(false, 300)
			if got := d("default/cli"); got != (Traffic{wantCli, 2, wantCli, 2}) {
				t.Errorf("cli pings: %+v, want %d bytes and 2 packets each way", got, wantCli)
			}
		})
	}
}

// TestFollowsInterfaces: with the default selection, a pod added while the
// tracer runs is traced at once, and one removed is forgotten (in clsact
// mode, its record in the state file too).
func TestFollowsInterfaces(t *testing.T) {
	for _, mode := range attachModes {
		t.Run(mode, func(t *testing.T) {
			node := testbed.NewNode(t, testbed.Routed)
			first := node.AddPod(t, "first")
			state := t.TempDir()
			c := startCollector(t, node, Config{Attach: mode, StateDir: state})
			names := func() string {
				var n []string
				for _, i := range c.tr.Interfaces() {
					n = append(n, i.Name+"="+i.Role.String())
				}
				return strings.Join(n, ",")
			}
			waitFor := func(what string, cond func() bool) {
				t.Helper()
				deadline := time.Now().Add(5 * time.Second)
				for !cond() {
					if time.Now().After(deadline) {
						t.Fatalf("%s: interfaces %s", what, names())
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			if got := names(); got != node.NIC+"=node_nic,"+first.HostVeth+"=pod_veth" {
				t.Fatalf("interfaces %s", got)
			}
			// The later veth's index is above the ifaces array: the
			// programs find it in the ifaces_high hash.
			later := node.AddPodAt(t, "later", ifacesArray+100)
			waitFor("the new pod's veth", func() bool { return strings.Contains(names(), later.HostVeth+"=pod_veth") })
			if i := slices.IndexFunc(c.tr.Interfaces(), func(i Interface) bool {
				return i.Name == later.HostVeth && i.Index == ifacesArray+100
			}); i < 0 {
				t.Fatalf("the later veth is not at index %d: %+v", ifacesArray+100, c.tr.Interfaces())
			}
			root := t.TempDir()
			randomFile(t, root, "f", 10)
			testbed.StartNginx(t, later.NS, 8080, root, later.IP)
			res := curl(t, first.NS, "http://"+netip.AddrPortFrom(later.IP, 8080).String()+"/f")
			x := c.wait(t, 1, 10*time.Second, and(onIface(later.HostVeth), func(x *Exchange) bool { return x.Index == 0 && x.Tx != nil }))[0]
			if x.Response.NewBytes != uint64(res[0].header+res[0].download) {
				t.Errorf("new pod: %s", x)
			}
			records := func() int {
				recs, err := newStateFile(state).records()
				if err != nil {
					t.Fatal(err)
				}
				return len(recs)
			}
			if mode == AttachClsact && records() != 3 {
				t.Errorf("state file holds %d qdiscs, want 3", records())
			}
			node.NS.IP(t, "link", "del", later.HostVeth)
			waitFor("the removed veth forgotten", func() bool { return !strings.Contains(names(), later.HostVeth) })
			if mode == AttachClsact && records() != 2 {
				t.Errorf("state file holds %d qdiscs, want 2", records())
			}
			c.close(t)
			if records() != 0 {
				t.Errorf("state file holds %d qdiscs after Close", records())
			}
		})
	}
}

// TestIdleFlush: the last exchange of a keep-alive connection left open is
// reported once idle (End "idle"), before the connection closes; the
// kernel's record of it at the close is dropped, not reported twice.
func TestIdleFlush(t *testing.T) {
	node := testbed.NewNode(t, testbed.Bridged)
	cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
	testbed.StartNginx(t, srv.NS, 8080, t.TempDir(), srv.IP)
	c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}, IdleFlush: 500 * time.Millisecond, NoWatch: true})
	req := `GET /echo HTTP/1.1\r\nHost: x\r\n\r\n`
	script := fmt.Sprintf(`exec 3<>/dev/tcp/%s/8080; printf '%s' >&3; sleep 0.3; printf '%s' >&3; sleep 2.5; exec 3>&-; sleep 0.2`,
		srv.IP, req, req)
	start := time.Now()
	done := make(chan struct{})
	go func() {
		defer close(done)
		cli.NS.Exec(t, "bash", "-c", script)
	}()
	xs := c.wait(t, 2, 2500*time.Millisecond, onIface(srv.HostVeth))
	if time.Since(start) >= 2800*time.Millisecond {
		t.Errorf("the idle exchange came only after %v", time.Since(start))
	}
	if xs[0].End != EndNextRequest || xs[1].End != EndIdle || xs[1].Index != 1 || xs[1].Tx == nil ||
		attrOf(xs[1], "url.path").AsString() != "/echo" || xs[1].Response.NewBytes != xs[0].Response.NewBytes {
		t.Errorf("exchanges:\n%s", describe(xs))
	}
	if s := xs[1].Session(); s.Wire.End != "idle" {
		t.Errorf("wire end %q", s.Wire.End)
	}
	// The idle record is made from the sessions table's entry: the
	// handshake, the exchange's times and flags come from its fields.
	if x, x0 := xs[1], xs[0]; x.SYN == 0 || x.SYN != x0.SYN || x.SYNACK != x0.SYNACK || x.SYNACK <= x.SYN ||
		x.ReqFirst <= x0.RespLast || x.ReqLast < x.ReqFirst || x.RespFirst <= x.ReqLast ||
		x.RespLast < x.RespFirst || x.EndTS <= x.RespLast {
		t.Errorf("idle exchange times: SYN %d SYN-ACK %d request %d..%d response %d..%d end %d (first exchange: SYN %d SYN-ACK %d response end %d)",
			x.SYN, x.SYNACK, x.ReqFirst, x.ReqLast, x.RespFirst, x.RespLast, x.EndTS, x0.SYN, x0.SYNACK, x0.RespLast)
	}
	if f := [2]uint8{xs[1].Request.Flags, xs[1].Response.Flags}; f != [2]uint8{0x18, 0x18} {
		t.Errorf("idle exchange flags %#x, want PSH|ACK both ways", f)
	}
	<-done
	time.Sleep(3 * PollInterval)
	if got := c.wait(t, 2, 0, onIface(srv.HostVeth)); len(got) != 2 {
		t.Errorf("after the close: %s", describe(got))
	}
	c.close(t) // the Assembler is the reader's until then
	// One per veth (the client's sees the same connection).
	if st := c.asm.Stats(); st.IdleFlushed != 2 || st.Duplicates != 2 {
		t.Errorf("assembler %+v", st)
	}
}

// TestTLSOnTheWire: HTTPS between two pods gives wire records with the
// L3/L4 facts only (no analyzer reads TLS), named after the table's
// protocol, while the same bytes counted on both veths agree.
func TestTLSOnTheWire(t *testing.T) {
	node := testbed.NewNode(t, testbed.Bridged)
	cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
	root := t.TempDir()
	randomFile(t, root, "a.bin", 20000)
	cert := testbed.SelfSignedCert(t, []netip.Addr{srv.IP})
	testbed.StartNginxTLS(t, srv.NS, 8443, root, cert.CertFile, cert.KeyFile, srv.IP)
	c := startCollector(t, node, Config{Ports: []Port{{Port: 8443, Protocol: "https"}}})
	url := "https://" + netip.AddrPortFrom(srv.IP, 8443).String() + "/a.bin"
	args := []string{"-sS", "-k", "--http1.1", "-o", "/dev/null", url, "-o", "/dev/null", url}
	cli.NS.Exec(t, "curl", args...)
	time.Sleep(3 * PollInterval)
	var total [2]map[string]uint64
	for i, veth := range []string{cli.HostVeth, srv.HostVeth} {
		xs := c.matching(onIface(veth))
		if len(xs) < 2 {
			t.Fatalf("%s: %d exchanges", veth, len(xs))
		}
		total[i] = map[string]uint64{}
		for _, x := range xs {
			s := x.Session()
			if x.Tx != nil || s.Tx.Protocol != "https" || s.Tx.Name != "https" || s.Tx.NumAttrs() != 0 || s.Wire.Interface != veth {
				t.Errorf("%s: %s", veth, x)
			}
			total[i]["request"] += x.Request.NewBytes
			total[i]["response"] += x.Response.NewBytes
		}
		if p := xs[0].RequestPrefix; len(p) < 6 || p[0] != 0x16 || p[1] != 0x03 || p[5] != 0x01 {
			t.Errorf("%s: the first request prefix is no TLS ClientHello: % x", veth, p[:min(len(p), 8)])
		}
		if xs[len(xs)-1].End != EndFIN || total[i]["response"] < 2*20000 {
			t.Errorf("%s: %s", veth, describe(xs))
		}
	}
	if total[0]["request"] != total[1]["request"] || total[0]["response"] != total[1]["response"] {
		t.Errorf("client veth %v, server veth %v", total[0], total[1])
	}
	c.close(t)
	if st := c.asm.Stats(); st.Parsed != 0 || st.Unrecognised == 0 {
		t.Errorf("assembler %+v", st)
	}
}

// pipelineClient is a client that pipelines HTTP/1.1 requests on one
// connection: in "burst" mode it sends all of them in one write; in
// "during" mode it sends the first, waits for the first byte of its
// response, then sends the others while that response is still on the
// wire. It reads until the server closes (the last request asks it to) and
// prints the bytes it sent and received.
const pipelineClient = `
import socket, sys, time
host, port, mode, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
def req(p, last):
    return ("GET %s HTTP/1.1\r\nHost: pipeline\r\n%s\r\n" % (p, "Connection: close\r\n" if last else "")).encode()
reqs = [req(p, i == len(paths) - 1) for i, p in enumerate(paths)]
s = socket.create_connection((host, port))
got = b""
if mode == "burst":
    s.sendall(b"".join(reqs))
else:
    s.sendall(reqs[0])
    got = s.recv(1)
    time.sleep(0.1)
    s.sendall(b"".join(reqs[1:]))
while True:
    b = s.recv(1 << 20)
    if not b:
        break
    got += b
print(" ".join(str(len(r)) for r in reqs), len(got))
`

// TestPipelinedHTTP: a client pipelines three requests to nginx, once all
// in one packet, once the later two sent while the first (8 MB) response
// is still on the wire (the kernel then sees request bytes after response
// bytes and ends its wire exchange in the middle of the first
// transaction). Each veth gives exactly one record per request/response
// pair, in order, with the method, path and status read from the wire,
// the exact size of each request, and response sizes and new bytes that
// add up to what the client received.
func TestPipelinedHTTP(t *testing.T) {
	testbed.RequireTool(t, "python3")
	node := testbed.NewNode(t, testbed.Bridged)
	cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
	root := t.TempDir()
	randomFile(t, root, "small.txt", 321)
	randomFile(t, root, "big.bin", 8<<20)
	testbed.StartNginx(t, srv.NS, 8080, root, srv.IP)
	c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}})
	script := filepath.Join(t.TempDir(), "pipeline.py")
	if err := os.WriteFile(script, []byte(pipelineClient), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		mode  string
		paths []string
		codes []int
	}{
		{"burst", []string{"/small.txt", "/missing", "/echo"}, []int{200, 404, 200}},
		{"during", []string{"/big.bin", "/small.txt", "/echo"}, []int{200, 200, 200}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			c.mu.Lock()
			c.xs = nil
			c.mu.Unlock()
			out := strings.Fields(cli.NS.Exec(t, "python3", append([]string{script, srv.IP.String(), "8080", tc.mode}, tc.paths...)...))
			var reqLens []int64
			var sent, received uint64
			for i, f := range out {
				var n int64
				fmt.Sscan(f, &n)
				if i < len(out)-1 {
					reqLens = append(reqLens, n)
					sent += uint64(n)
				} else {
					received = uint64(n)
				}
			}
			for _, veth := range []string{cli.HostVeth, srv.HostVeth} {
				xs := c.wait(t, 3, 10*time.Second, onIface(veth))
				var reqNew, respNew, respL7 uint64
				for i, x := range xs {
					wantEnd := EndPipelined
					if i == 2 {
						wantEnd = EndFIN
					}
					if x.Index != i || x.Tx == nil || pathOf(x) != tc.paths[i] || attrOf(x, "http.request.method").AsString() != "GET" ||
						x.Tx.ReqBytes != reqLens[i] || x.Client.Addr() != cli.IP {
						t.Errorf("%s #%d: %s (tx %+v)", veth, i, x, x.Tx)
						continue
					}
					if x.End != wantEnd && !(tc.mode == "during" && i == 0 && x.End == EndNextRequest) {
						t.Errorf("%s #%d: end %v", veth, i, x.End)
					}
					switch {
					case x.Tx.StatusCode == tc.codes[i] && !x.Tx.Truncated && x.Phase == PhaseResponse:
					case tc.mode == "during" && i > 0 && (x.Tx.Truncated || x.Tx.NoResponse):
						// Its response began inside a packet that did
						// not begin a message (nginx appended it to the
						// big response's last segment): not read.
						t.Logf("%s #%d: response not read from the wire: %s", veth, i, x)
					default:
						t.Errorf("%s #%d: %s (tx %+v)", veth, i, x, x.Tx)
					}
					reqNew += x.Request.NewBytes
					respNew += x.Response.NewBytes
					respL7 += uint64(x.Tx.RespBytes)
				}
				if reqNew != sent || respNew != received || respL7 != received {
					t.Errorf("%s: new bytes %d/%d, L7 response bytes %d; the client sent %d and received %d",
						veth, reqNew, respNew, respL7, sent, received)
				}
				if tc.mode == "burst" && (xs[0].Request.NewBytes != sent || xs[1].Request.Packets != 0 || xs[2].Request.Packets != 0) {
					t.Errorf("%s: one packet carried the three requests: %s", veth, describe(xs))
				}
				if tc.mode == "during" && attrOf(xs[0], "http.response.body.size").AsInt64() != 8<<20 {
					t.Errorf("%s: the first response's body %v bytes", veth, attrOf(xs[0], "http.response.body.size"))
				}
				t.Logf("%s %s: first record ends %v (%s)", tc.mode, veth, xs[0].End,
					map[bool]string{true: "the wire exchange ended inside the first transaction", false: "the first response was on the wire before the next request"}[xs[0].End == EndPipelined])
			}
		})
	}
	if st, _ := c.tr.Stats(); st.ExchangesLost+st.PayloadsLost+st.MarkLimit != 0 {
		t.Errorf("losses: %+v", st)
	}
	c.close(t)
	if as := c.asm.Stats(); as.Parsed != 12 || as.Orphans != 0 || as.Unparsed != 0 || c.asm.Conns() != 0 {
		t.Errorf("assembler %+v conns %d", as, c.asm.Conns())
	}
}
