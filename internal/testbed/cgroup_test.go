package testbed

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupOf returns the cgroup v2 path of pid (the "0::" line of
// /proc/<pid>/cgroup).
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p
		}
	}
	t.Fatalf("no cgroup v2 line in /proc/%d/cgroup:\n%s", pid, b)
	return ""
}

// waitComm waits until /proc/pid/comm is comm (after ip netns exec execs).
func waitComm(t *testing.T, pid int, comm string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
		if strings.TrimSpace(string(b)) == comm {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is %q, not %q, after 5s", pid, b, comm)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestCgroup2Mount(t *testing.T) {
	m, err := Cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup2 here: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(m, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type != unix.CGROUP2_SUPER_MAGIC {
		t.Errorf("%s: file system magic %#x; want cgroup2", m, st.Type)
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/sys/fs/cgroup`:     "/sys/fs/cgroup",
		`/mnt/a\040b`:        "/mnt/a b",
		`/x\134y`:            `/x\y`,
		`/trailing\04`:       `/trailing\04`,
		`/tab\011and\012nl`:  "/tab\tand\nnl",
		`/not\999octal\0401`: "/not\\999octal 1",
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q; want %q", in, got, want)
		}
	}
}

func TestCgroup(t *testing.T) {
	RequireRoot(t)
	RequireTool(t, "ip")
	RequireTool(t, "sleep")

	var dirs []string
	waits := make(chan error, 2)
	t.Run("start", func(t *testing.T) {
		cg := NewCgroup(t, "web")
		dirs = append(dirs, cg.Dir())
		mount, _ := Cgroup2Mount()
		if !strings.HasPrefix(cg.Path(), "/"+CgroupParent+"/web-") || cg.Dir() != filepath.Join(mount, cg.Path()) {
			t.Errorf("Path() = %q, Dir() = %q", cg.Path(), cg.Dir())
		}

		// ID is the directory's inode, and the kernel's cgroup ID (the
		// kernfs file handle that name_to_handle_at returns).
		if got := inode(t, cg.Dir()); got != cg.ID() || got == 0 {
			t.Errorf("ID() = %d; inode is %d", cg.ID(), got)
		}
		h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, cg.Dir(), 0)
		if err != nil {
			t.Fatalf("name_to_handle_at: %v", err)
		}
		if b := h.Bytes(); len(b) != 8 || binary.NativeEndian.Uint64(b) != cg.ID() {
			t.Errorf("kernel cgroup ID (file handle) %x; ID() = %d", b, cg.ID())
		}

		// A plain command, started straight into the cgroup.
		sleeper := exec.Command("sleep", "300")
		if err := cg.Start(sleeper); err != nil {
			t.Fatal(err)
		}
		go func() { waits <- sleeper.Wait() }()
		if got := cgroupOf(t, sleeper.Process.Pid); got != cg.Path() {
			t.Errorf("/proc/%d/cgroup: %q; want %q", sleeper.Process.Pid, got, cg.Path())
		}

		// A command in a network namespace and the cgroup at once.
		ns := NewNetns(t, "cg")
		nsSleeper := ns.Command(context.Background(), "sleep", "301")
		if err := cg.Start(nsSleeper); err != nil {
			t.Fatal(err)
		}
		go func() { waits <- nsSleeper.Wait() }()
		pid := nsSleeper.Process.Pid
		waitComm(t, pid, "sleep")
		if got := cgroupOf(t, pid); got != cg.Path() {
			t.Errorf("/proc/%d/cgroup: %q; want %q", pid, got, cg.Path())
		}
		if got, want := inode(t, "/proc/"+strconv.Itoa(pid)+"/ns/net"), inode(t, ns.Path()); got != want {
			t.Errorf("pid %d in netns %d; want %s (%d)", pid, got, ns.Name, want)
		}

		procs, err := cg.Procs()
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(procs)
		want := []int{sleeper.Process.Pid, pid}
		slices.Sort(want)
		if !slices.Equal(procs, want) {
			t.Errorf("Procs() = %v; want %v", procs, want)
		}

		// Add moves an existing process in.
		late := exec.Command("sleep", "302")
		if err := late.Start(); err != nil {
			t.Fatal(err)
		}
		defer late.Wait()
		defer late.Process.Kill()
		if err := cg.Add(late.Process.Pid); err != nil {
			t.Fatal(err)
		}
		if got := cgroupOf(t, late.Process.Pid); got != cg.Path() {
			t.Errorf("after Add: /proc/%d/cgroup: %q; want %q", late.Process.Pid, got, cg.Path())
		}
	})

	// Cleanup killed what was left in the cgroup and removed it.
	for i := 0; i < 2; i++ {
		select {
		case err := <-waits:
			if err == nil || !strings.Contains(err.Error(), "killed") {
				t.Errorf("process in the cgroup ended with %v; want killed", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("a process in the cgroup still runs after cleanup")
		}
	}
	for _, d := range dirs {
		if _, err := os.Stat(d); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s still exists after cleanup (%v)", d, err)
		}
	}
}

func TestFreePortWaitTCP(t *testing.T) {
	p := FreePort(t)
	addr := "127.0.0.1:" + strconv.Itoa(p)
	if err := WaitTCP(addr, 200*time.Millisecond); err == nil {
		t.Fatalf("WaitTCP(%s) succeeded with nothing listening", addr)
	}
	ls := make(chan net.Listener, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		l, err := net.Listen("tcp", addr)
		if err != nil {
			t.Errorf("listen %s: %v", addr, err)
		}
		ls <- l
	}()
	defer func() {
		if l := <-ls; l != nil {
			l.Close()
		}
	}()
	if err := WaitTCP(addr, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}
