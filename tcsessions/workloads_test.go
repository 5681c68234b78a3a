package tcsessions

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/clovisor/clovisor/internal/testbed"
)

// TestCgroupWorkload: how a process's cgroup names its workload.
func TestCgroupWorkload(t *testing.T) {
	id := "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	for path, want := range map[string]string{
		"/system.slice/docker-" + id + ".scope":                               "0123456789ab",
		"/kubepods.slice/kubepods-pod1.slice/cri-containerd-" + id + ".scope": "0123456789ab",
		"/kubepods/besteffort/pod0f2b/" + id:                                  "0123456789ab",
		"/machine.slice/libpod-" + id + ".scope/container":                    "0123456789ab",
		"/system.slice/nginx.service":                                         "nginx",
		"/user.slice/user-0.slice/session-4.scope":                            "session-4",
		"/system.slice/docker-" + id[:20] + ".scope":                          "docker-0123456789abcdef0123",
		"/": "",
		"/clovisor-test/ctr-x/somethingelse-" + id + ".scope": "somethingelse-" + id,
	} {
		if got := cgroupWorkload(path); got != want {
			t.Errorf("%s: %q, want %q", path, got, want)
		}
	}
}

// containerPod starts a process in a network namespace of its own (no name
// in /run/netns), in a cgroup named as Docker's systemd driver names a
// container's, and connects the namespace to the node as AddPod does (IPv4
// only). It returns the container ID, the node-side veth and the address.
func containerPod(t *testing.T, node *testbed.Node, n int) (id, veth string, ip netip.Addr) {
	t.Helper()
	testbed.RequireTool(t, "unshare")
	testbed.RequireTool(t, "nsenter")
	cg := testbed.NewCgroup(t, "ctr")
	var b [32]byte
	rand.Read(b[:])
	id = hex.EncodeToString(b[:])
	leaf := filepath.Join(cg.Dir(), "docker-"+id+".scope")
	if err := os.Mkdir(leaf, 0o755); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(leaf)
	if err != nil {
		t.Fatal(err)
	}
	// The shell says when unshare has made the namespace (it runs in it),
	// then becomes the container's process, with the same PID.
	cmd := exec.Command("unshare", "--net", "sh", "-c", "echo ready; exec sleep 600")
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(d.Fd())}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Start()
	d.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if err := os.Remove(leaf); err != nil {
			t.Errorf("removing %s: %v", leaf, err)
		}
	})
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("unshare: %q %v", line, err)
	}
	pid := strconv.Itoa(cmd.Process.Pid)
	nsPath := "/proc/" + pid + "/ns/net"
	in := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("nsenter", append([]string{"--net=" + nsPath, "ip"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v in the container: %v: %s", args, err, out)
		}
	}
	veth = "clvc" + hex.EncodeToString(b[:4])
	if out, err := exec.Command("ip", "link", "add", "name", veth, "netns", node.NS.Name, "type", "veth",
		"peer", "name", "eth0", "netns", pid).CombinedOutput(); err != nil {
		t.Fatalf("veth: %v: %s", err, out)
	}
	in("link", "set", "lo", "up")
	switch node.Topology {
	case testbed.Bridged:
		ip = netip.MustParseAddr(fmt.Sprintf("10.201.20.%d", n))
		node.NS.IP(t, "link", "set", veth, "master", node.Bridge)
		node.NS.IP(t, "link", "set", veth, "up")
		in("addr", "add", ip.String()+"/24", "dev", "eth0")
		in("link", "set", "eth0", "up")
		in("route", "add", "default", "via", "10.201.20.1")
	case testbed.Routed:
		ip = netip.MustParseAddr(fmt.Sprintf("10.201.21.%d", n))
		node.NS.Exec(t, "sysctl", "-q", "-w", "net.ipv4.conf."+veth+".proxy_arp=1")
		node.NS.IP(t, "link", "set", veth, "up")
		node.NS.IP(t, "route", "add", ip.String()+"/32", "dev", veth, "scope", "link")
		in("addr", "add", ip.String()+"/32", "dev", "eth0")
		in("link", "set", "eth0", "up")
		in("route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		in("route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	}
	return id, veth, ip
}

var pingRE = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// ping pings dst count times with size bytes of data from ns and returns
// the echo requests sent and the replies received, as ping reports them.
func ping(t *testing.T, ns *testbed.Netns, dst netip.Addr, count, size int) (sent, received uint64) {
	t.Helper()
	out := ns.Exec(t, "ping", "-c", strconv.Itoa(count), "-s", strconv.Itoa(size), "-i", "0.05", dst.String())
	m := pingRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("ping output: %s", out)
	}
	sent, _ = strconv.ParseUint(m[1], 10, 64)
	received, _ = strconv.ParseUint(m[2], 10, 64)
	return sent, received
}

// TestAutoWorkloads: with nothing configured, every pod veth's workload is
// named (the namespace's name in /run/netns; a process's container ID when
// the namespace has no name) and the addresses of the veth's peer are
// mapped to it, following addresses that come and go, veths that go, and
// yielding to addresses given with SetWorkload. Traffic between the
// outside and the pods then counts per workload on the node NIC, exactly:
// the bytes and packets of the pings ping reports, and, for an HTTP
// transfer, the bytes of the NIC's records of it, whose stream bytes are
// curl's.
func TestAutoWorkloads(t *testing.T) {
	testbed.RequireTool(t, "ping")
	for _, topo := range topologies {
		t.Run(topo.String(), func(t *testing.T) {
			node := testbed.NewNode(t, topo)
			cli, srv := node.AddPod(t, "cli"), node.AddPod(t, "srv")
			ctrID, ctrVeth, ctrIP := containerPod(t, node, 60)
			root := t.TempDir()
			randomFile(t, root, "x.bin", 70000)
			testbed.StartNginx(t, srv.NS, 8080, root, srv.IP, srv.IP6)
			c := startCollector(t, node, Config{Ports: []Port{{Port: 8080, Protocol: "http"}}, WorkloadRefresh: 100 * time.Millisecond})

			ctr := ctrID[:12]
			want := map[string][]netip.Addr{
				cli.NS.Name: {cli.IP, cli.IP6},
				srv.NS.Name: {srv.IP, srv.IP6},
				ctr:         {ctrIP},
			}
			waitWorkloads := func(what string, want map[string][]netip.Addr) {
				t.Helper()
				for _, l := range want {
					slices.SortFunc(l, netip.Addr.Compare)
				}
				deadline := time.Now().Add(5 * time.Second)
				for {
					got := c.tr.Workloads()
					if fmt.Sprint(got) == fmt.Sprint(want) {
						return
					}
					if time.Now().After(deadline) {
						t.Fatalf("%s: workloads %v, want %v", what, got, want)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			waitWorkloads("at start", want)
			for veth, name := range map[string]string{cli.HostVeth: cli.NS.Name, srv.HostVeth: srv.NS.Name, ctrVeth: ctr} {
				if got := c.tr.workloadAt(c.tr.indexOf(veth), netip.Addr{}); got != name {
					t.Errorf("workload of %s: %q, want %q", veth, got, name)
				}
			}

			// Traffic through the NIC, counted per workload.
			before, err := c.tr.WorkloadTraffic()
			if err != nil {
				t.Fatal(err)
			}
			res := curl(t, node.Outside, "http://"+netip.AddrPortFrom(srv.IP, 8080).String()+"/x.bin")
			nic := c.wait(t, 1, 10*time.Second, onIface(node.NIC))[0]
			if nic.Response.NewBytes != uint64(res[0].header+res[0].download) || nic.Request.NewBytes != uint64(res[0].request) ||
				nic.Workload != srv.NS.Name || nic.ClientInside() {
				t.Errorf("NIC record %s (workload %q), curl %+v", nic, nic.Workload, res[0])
			}
			s4, r4 := ping(t, node.Outside, srv.IP, 3, 100)
			s6, r6 := ping(t, node.Outside, srv.IP6, 2, 200)
			sc, rc := ping(t, node.Outside, ctrIP, 4, 300)
			so, ro := ping(t, cli.NS, node.OutsideIP, 2, 400)
			ping(t, cli.NS, srv.IP, 2, 50) // pod to pod: not on the NIC
			after, err := c.tr.WorkloadTraffic()
			if err != nil {
				t.Fatal(err)
			}
			d := func(name string) Traffic {
				a, b := after[name], before[name]
				return Traffic{a.RxBytes - b.RxBytes, a.RxPackets - b.RxPackets, a.TxBytes - b.TxBytes, a.TxPackets - b.TxPackets}
			}
			// The server's side of the transfer: every packet it sent
			// is in the record. Its side of the pings: requests in,
			// replies out.
			wantSrv := Traffic{
				RxBytes: s4*pingBytes(false, 100) + s6*pingBytes(true, 200), RxPackets: s4 + s6,
				TxBytes: nic.Response.Bytes + r4*pingBytes(false, 100) + r6*pingBytes(true, 200), TxPackets: nic.Response.Packets + r4 + r6,
			}
			got := d(srv.NS.Name)
			// The transfer's packets to the server: the record's, and
			// the last ACK after both FINs (after the record).
			if rx := got.RxBytes - wantSrv.RxBytes; rx < nic.Request.Bytes || rx > nic.Request.Bytes+100 {
				t.Errorf("srv received %d bytes of the transfer, the NIC record says %d (+ the last ACK)", rx, nic.Request.Bytes)
			}
			got.RxBytes, got.RxPackets = wantSrv.RxBytes, wantSrv.RxPackets
			if got != wantSrv {
				t.Errorf("srv: %+v, want %+v", d(srv.NS.Name), wantSrv)
			}
			if got, want := d(ctr), (Traffic{sc * pingBytes(false, 300), sc, rc * pingBytes(false, 300), rc}); got != want {
				t.Errorf("container: %+v, want %+v", got, want)
			}
			if got, want := d(cli.NS.Name), (Traffic{ro * pingBytes(false, 400), ro, so * pingBytes(false, 400), so}); got != want {
				t.Errorf("cli: %+v, want %+v", got, want)
			}
			if s4+s6+sc+so == 0 || r4 != s4 || rc != sc {
				t.Errorf("pings: %d/%d %d/%d %d/%d %d/%d", s4, r4, s6, r6, sc, rc, so, ro)
			}

			// Addresses come and go.
			extra := netip.MustParseAddr("10.201.23.7")
			srv.NS.IP(t, "addr", "add", extra.String()+"/32", "dev", "eth0")
			want[srv.NS.Name] = []netip.Addr{srv.IP, extra, srv.IP6}
			waitWorkloads("an address added", want)
			srv.NS.IP(t, "addr", "del", extra.String()+"/32", "dev", "eth0")
			want[srv.NS.Name] = []netip.Addr{srv.IP, srv.IP6}
			waitWorkloads("an address removed", want)

			// Addresses given with SetWorkload win, and come back when
			// it is removed.
			if err := c.tr.SetWorkload("default/srv", srv.IP); err != nil {
				t.Fatal(err)
			}
			want["default/srv"] = []netip.Addr{srv.IP}
			want[srv.NS.Name] = []netip.Addr{srv.IP6}
			waitWorkloads("SetWorkload", want)
			if err := c.tr.RemoveWorkload("default/srv"); err != nil {
				t.Fatal(err)
			}
			delete(want, "default/srv")
			want[srv.NS.Name] = []netip.Addr{srv.IP, srv.IP6}
			waitWorkloads("RemoveWorkload", want)

			// A veth that goes takes its workload with it.
			node.NS.IP(t, "link", "del", ctrVeth)
			delete(want, ctr)
			waitWorkloads("the container's veth removed", want)
		})
	}
}
