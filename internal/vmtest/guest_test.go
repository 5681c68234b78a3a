package vmtest

// Guest-side tests: they run only inside a VM booted by the host tests of
// vmtest_test.go (InGuest), and check what the harness promises the VM has.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// requireGuest skips the test outside a vmtest VM.
func requireGuest(t *testing.T) {
	t.Helper()
	if !InGuest() {
		t.Skip("guest-side test: runs only inside a vmtest VM (see TestVMGuestFacts)")
	}
}

func TestGuestKernelRelease(t *testing.T) {
	requireGuest(t)
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	got := unix.ByteSliceToString(u.Release[:])
	if want := os.Getenv(EnvKernel); got != want {
		t.Fatalf("uname -r = %q, the host booted %q", got, want)
	}
	t.Logf("uname -r = %s", got)
}

func TestGuestSysfs(t *testing.T) {
	requireGuest(t)
	for _, p := range []string{
		"/sys/kernel/btf/vmlinux",
		"/sys/bus/event_source/devices/kprobe",
		"/sys/module/veth",
		"/sys/module/tls",
		"/sys/module/sch_ingress",
		"/sys/module/cls_bpf",
		"/sys/kernel/tracing/events",
		"/sys/fs/cgroup/cgroup.controllers",
	} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%v", err)
		}
	}
}

func TestGuestMounts(t *testing.T) {
	requireGuest(t)
	f, err := os.Open("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := map[string]string{} // mount point -> fs type
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fs := strings.Fields(s.Text()); len(fs) >= 3 {
			got[fs[1]] = fs[2]
		}
	}
	for mp, typ := range map[string]string{
		"/proc": "proc", "/sys": "sysfs", "/dev": "devtmpfs", "/tmp": "tmpfs", "/run": "tmpfs",
		"/sys/fs/bpf": "bpf", "/sys/kernel/tracing": "tracefs", "/sys/kernel/debug": "debugfs",
		"/sys/fs/cgroup": "cgroup2",
	} {
		if got[mp] != typ {
			t.Errorf("%s: mounted as %q, want %q", mp, got[mp], typ)
		}
	}
	if lo, err := net.InterfaceByName("lo"); err != nil || lo.Flags&net.FlagUp == 0 {
		t.Errorf("lo is not up: %v %v", lo, err)
	}
}

func TestGuestVethPair(t *testing.T) {
	requireGuest(t)
	if err := addVethPair("cvm-a", "cvm-b"); err != nil {
		t.Fatalf("creating veth pair over netlink: %v", err)
	}
	a, err := net.InterfaceByName("cvm-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := net.InterfaceByName("cvm-b")
	if err != nil {
		t.Fatal(err)
	}
	// Each end's iflink is the other's ifindex.
	for _, c := range []struct {
		name string
		peer int
	}{{"cvm-a", b.Index}, {"cvm-b", a.Index}} {
		raw, err := os.ReadFile("/sys/class/net/" + c.name + "/iflink")
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := strconv.Atoi(strings.TrimSpace(string(raw))); n != c.peer {
			t.Errorf("%s: iflink %d, want its peer's ifindex %d", c.name, n, c.peer)
		}
	}
	t.Logf("veth pair cvm-a (%d) <-> cvm-b (%d)", a.Index, b.Index)
}

// vethInfoPeer is VETH_INFO_PEER of linux/veth.h (not in x/sys/unix).
const vethInfoPeer = 1

// addVethPair creates the veth pair a <-> b with one RTM_NEWLINK request.
func addVethPair(a, b string) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}

	ifinfo := make([]byte, unix.SizeofIfInfomsg) // AF_UNSPEC, all zero
	peer := append(append([]byte{}, ifinfo...), rtattr(unix.IFLA_IFNAME, cstring(b))...)
	linkinfo := append(rtattr(unix.IFLA_INFO_KIND, []byte("veth")),
		rtattr(unix.IFLA_INFO_DATA, rtattr(vethInfoPeer, peer))...)
	body := append(append(ifinfo, rtattr(unix.IFLA_IFNAME, cstring(a))...), rtattr(unix.IFLA_LINKINFO, linkinfo)...)

	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(msg[0:], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(msg[4:], unix.RTM_NEWLINK)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	binary.NativeEndian.PutUint32(msg[8:], 1) // seq
	msg = append(msg, body...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}

	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if errno := int32(binary.NativeEndian.Uint32(m.Data)); errno != 0 {
				return unix.Errno(-errno)
			}
			return nil
		}
	}
	return errors.New("no netlink ack")
}

// rtattr encodes one route attribute, padded to 4 bytes.
func rtattr(typ uint16, data []byte) []byte {
	b := make([]byte, 4, 4+len(data)+3)
	binary.NativeEndian.PutUint16(b[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func cstring(s string) []byte { return append([]byte(s), 0) }

// counterProgram returns instructions that add 1 to element 0 of the array
// map m and return 0.
func counterProgram(m *ebpf.Map) asm.Instructions {
	return asm.Instructions{
		asm.StoreImm(asm.RFP, -4, 0, asm.Word), // key = 0
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "exit"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("exit"),
		asm.Return(),
	}
}

func TestGuestKprobeTCPSendmsg(t *testing.T) {
	requireGuest(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	// The smallest program first: attaching is the fact the host lacks.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.Kprobe,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatalf("loading kprobe program: %v", err)
	}
	defer prog.Close()
	kp, err := link.Kprobe("tcp_sendmsg", prog, nil)
	if err != nil {
		t.Fatalf("attaching kprobe to tcp_sendmsg: %v", err)
	}
	kp.Close()

	// Then one that counts, to see it fire.
	count, m := attachCounter(t, &ebpf.ProgramSpec{Type: ebpf.Kprobe, License: "GPL"},
		func(p *ebpf.Program) (link.Link, error) { return link.Kprobe("tcp_sendmsg", p, nil) })
	defer m.Close()
	sendTCP(t, 3)
	if n := count(); n < 3 {
		t.Fatalf("kprobe on tcp_sendmsg fired %d times for 3 sends", n)
	} else {
		t.Logf("kprobe on tcp_sendmsg attached and fired %d times", n)
	}
}

func TestGuestFentryTCPSendmsg(t *testing.T) {
	requireGuest(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	count, m := attachCounter(t, &ebpf.ProgramSpec{
		Type: ebpf.Tracing, AttachType: ebpf.AttachTraceFEntry, AttachTo: "tcp_sendmsg", License: "GPL",
	}, func(p *ebpf.Program) (link.Link, error) { return link.AttachTracing(link.TracingOptions{Program: p}) })
	defer m.Close()
	sendTCP(t, 3)
	if n := count(); n < 3 {
		t.Fatalf("fentry on tcp_sendmsg fired %d times for 3 sends", n)
	} else {
		t.Logf("fentry on tcp_sendmsg attached and fired %d times", n)
	}
}

// attachCounter loads spec with counterProgram's instructions, attaches it
// with attach (closed at the end of the test), and returns a function that
// reads the counter, and the counter's map.
func attachCounter(t *testing.T, spec *ebpf.ProgramSpec, attach func(*ebpf.Program) (link.Link, error)) (func() uint64, *ebpf.Map) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatalf("creating counter map: %v", err)
	}
	spec.Instructions = counterProgram(m)
	prog, err := ebpf.NewProgram(spec)
	if err != nil {
		m.Close()
		t.Fatalf("loading %v program: %v", spec.Type, err)
	}
	t.Cleanup(func() { prog.Close() })
	l, err := attach(prog)
	if err != nil {
		m.Close()
		t.Fatalf("attaching %v program: %v", spec.Type, err)
	}
	t.Cleanup(func() { l.Close() })
	return func() uint64 {
		var v uint64
		if err := m.Lookup(uint32(0), &v); err != nil {
			t.Fatalf("reading counter: %v", err)
		}
		return v
	}, m
}

// sendTCP makes a TCP connection on loopback and sends n messages over it
// (n tcp_sendmsg calls), which the server reads to the end.
func sendTCP(t *testing.T, n int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_, err = io.Copy(io.Discard, c)
		done <- err
	}()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if _, err := c.Write([]byte("ping " + strconv.Itoa(i) + "\n")); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
