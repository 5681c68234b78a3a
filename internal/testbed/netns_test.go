package testbed

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// inode returns the inode number of path (following symlinks).
func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// threadNetns returns the inode of the calling thread's network namespace.
func threadNetns() (uint64, error) {
	var st syscall.Stat_t
	err := syscall.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &st)
	return st.Ino, err
}

// hostLinks returns the names of the links in the test process's namespace.
func hostLinks(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link show: %v: %s", err, out)
	}
	return string(out)
}

// echoAcross listens on listenAddr inside srv, dials it from inside cli and
// checks that a line goes there and back, and that the server sees wantPeer
// as the client's address.
func echoAcross(t *testing.T, srv, cli *Netns, listenIP, wantPeer netip.Addr) {
	t.Helper()
	var l net.Listener
	if err := srv.Run(t, func() (err error) {
		l, err = net.Listen("tcp", netip.AddrPortFrom(listenIP, 0).String())
		return err
	}); err != nil {
		t.Fatalf("listen in %s: %v", srv.Name, err)
	}
	defer l.Close()
	// The listener stays in srv's namespace; serve it from any goroutine.
	peer := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			peer <- "accept: " + err.Error()
			return
		}
		defer c.Close()
		peer <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String()
		line, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "echo %s", line)
	}()

	var reply string
	err := cli.Run(t, func() error {
		c, err := net.DialTimeout("tcp", l.Addr().String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "hello from %s\n", cli.Name)
		reply, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	if err != nil {
		t.Fatalf("dial %s from %s: %v", l.Addr(), cli.Name, err)
	}
	if want := "echo hello from " + cli.Name + "\n"; reply != want {
		t.Errorf("reply = %q; want %q", reply, want)
	}
	if got := <-peer; got != wantPeer.String() {
		t.Errorf("server saw peer %s; want %s", got, wantPeer)
	}
}

func TestNetnsVethPair(t *testing.T) {
	RequireRoot(t)
	RequireTool(t, "ip")

	RequireTool(t, "ping")
	var names []string
	var veths []*Veth
	sleeperDone := make(chan error, 1)
	t.Run("connect", func(t *testing.T) {
		a := NewNetns(t, "a")
		b := NewNetns(t, "b")
		names = append(names, a.Name, b.Name)
		if !strings.HasPrefix(a.Name, "clvt-a-") || a.Name == b.Name {
			t.Errorf("namespace names %q, %q", a.Name, b.Name)
		}
		if _, err := os.Stat(a.Path()); err != nil {
			t.Fatal(err)
		}

		ip4a, ip4b := netip.MustParsePrefix("10.201.1.1/24"), netip.MustParsePrefix("10.201.1.2/24")
		ip6a, ip6b := netip.MustParsePrefix("fd00:c10::1/64"), netip.MustParsePrefix("fd00:c10::2/64")
		veths = append(veths, VethPair(t, a, b, ip4a, ip4b))
		veths = append(veths, VethPair(t, a, b, ip6a, ip6b))

		// The links live only in the namespaces.
		host := hostLinks(t)
		for _, v := range veths {
			if strings.Contains(host, v.A) || strings.Contains(host, v.B) {
				t.Errorf("veth %s/%s visible in the host namespace", v.A, v.B)
			}
		}

		echoAcross(t, a, b, ip4a.Addr(), ip4b.Addr())
		echoAcross(t, b, a, ip6b.Addr(), ip6a.Addr())
		echoAcross(t, a, a, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.1")) // lo is up

		// Command runs a program inside the namespace.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := a.Command(ctx, "ip", "-o", "addr", "show", "dev", veths[0].A).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "inet 10.201.1.1/24") {
			t.Errorf("ip addr inside %s: %v: %s", a.Name, err, out)
		}
		out, err = b.Command(ctx, "ping", "-c", "1", "-W", "5", ip4a.Addr().String()).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "1 received") {
			t.Errorf("ping from %s: %v: %s", b.Name, err, out)
		}
		// A process left running inside is killed by the cleanup.
		sleeper := b.Command(context.Background(), "sleep", "300")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { sleeperDone <- sleeper.Wait() }()
	})

	for _, n := range names {
		if _, err := os.Stat("/run/netns/" + n); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("namespace %s still exists after cleanup (%v)", n, err)
		}
	}
	host := hostLinks(t)
	for _, v := range veths {
		if strings.Contains(host, v.A) || strings.Contains(host, v.B) {
			t.Errorf("veth %s/%s exists after cleanup", v.A, v.B)
		}
	}
	select {
	case err := <-sleeperDone:
		if err == nil || !strings.Contains(err.Error(), "killed") {
			t.Errorf("process left in the namespace ended with %v; want killed", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("process left in the namespace still runs after cleanup")
	}
}

func TestVethPairHostEnd(t *testing.T) {
	RequireRoot(t)
	RequireTool(t, "ip")
	var v *Veth
	t.Run("create", func(t *testing.T) {
		pod := NewNetns(t, "pod")
		v = VethPair(t, nil, pod, netip.Prefix{}, netip.MustParsePrefix("10.201.2.2/24"))
		if !strings.Contains(hostLinks(t), v.A+"@") {
			t.Errorf("host end %s not in the host namespace", v.A)
		}
	})
	if strings.Contains(hostLinks(t), v.A) {
		t.Errorf("host end %s still exists after cleanup", v.A)
	}
}

func TestNetnsRun(t *testing.T) {
	RequireRoot(t)
	RequireTool(t, "ip")
	ns := NewNetns(t, "run")
	want := inode(t, ns.Path())
	before, err := threadNetns()
	if err != nil {
		t.Fatal(err)
	}
	if before == want {
		t.Fatal("test already runs in the new namespace")
	}

	var inside uint64
	sentinel := errors.New("sentinel")
	err = ns.Run(t, func() error {
		var err error
		inside, err = threadNetns()
		if err != nil {
			return err
		}
		return sentinel
	})
	if !errors.Is(err, sentinel) {
		t.Errorf("Run returned %v; want fn's error", err)
	}
	if inside != want {
		t.Errorf("inside Run: netns inode %d; want %d", inside, want)
	}

	// A panic in fn reaches the caller, and no thread stays in the namespace:
	// run many times and check every goroutine afterwards sees the host netns.
	func() {
		defer func() {
			if p := recover(); p != "boom" {
				t.Errorf("recovered %v; want boom", p)
			}
		}()
		ns.Run(t, func() error { panic("boom") })
	}()
	for i := 0; i < 20; i++ {
		if err := ns.Run(t, func() error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		go func() {
			// Lock so the check and the thread agree.
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			func() {
				got, err := threadNetns()
				if err == nil && got != before {
					err = fmt.Errorf("a thread is in netns %d, not the original %d", got, before)
				}
				errs <- err
			}()
		}()
	}
	for i := 0; i < 50; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}
