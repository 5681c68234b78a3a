package testbed

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CgroupParent is the directory, under the cgroup2 mount, that holds the
// cgroups tests create.
const CgroupParent = "clovisor-test"

// Cgroup is a cgroup v2 group made for one test. Create it with NewCgroup.
type Cgroup struct {
	mount string // cgroup2 mount point, e.g. /sys/fs/cgroup/unified
	rel   string // path relative to mount, starting with /
	id    uint64
}

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy, read from
// /proc/self/mountinfo: /sys/fs/cgroup on pure v2 hosts,
// /sys/fs/cgroup/unified on hybrid ones.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		// ID parent major:minor root mountpoint options [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(s.Text(), " - ")
		if !ok {
			continue
		}
		if fs := strings.Fields(post); len(fs) == 0 || fs[0] != "cgroup2" {
			continue
		}
		if f := strings.Fields(pre); len(f) >= 5 {
			return unescapeMountinfo(f[4]), nil
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 file system mounted (see /proc/self/mountinfo)")
}

// unescapeMountinfo undoes the octal escapes (\040 for space, ...) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// NewCgroup creates the cgroup <cgroup2 mount>/clovisor-test/<name>-<random>.
// When the test ends, processes still in it are killed and its directory is
// removed (and clovisor-test too, once empty).
func NewCgroup(t testing.TB, name string) *Cgroup {
	t.Helper()
	mount, err := Cgroup2Mount()
	if err != nil {
		skipOrFail(t, "NewCgroup: %v", err)
		return nil
	}
	name = nameRE.ReplaceAllString(name, "_")
	c := &Cgroup{mount: mount, rel: "/" + CgroupParent + "/" + name + "-" + randSuffix(8)}
	parent := filepath.Join(mount, CgroupParent)
	if err := os.Mkdir(parent, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatalf("NewCgroup: %v", err)
	}
	if err := os.Mkdir(c.Dir(), 0o755); err != nil {
		t.Fatalf("NewCgroup: %v", err)
	}
	t.Cleanup(func() {
		if err := c.remove(); err != nil {
			t.Errorf("NewCgroup cleanup: %v", err)
		}
		_ = os.Remove(parent) // fails while other tests still use it
	})
	var st syscall.Stat_t
	if err := syscall.Stat(c.Dir(), &st); err != nil {
		t.Fatalf("NewCgroup: %v", err)
	}
	c.id = st.Ino
	return c
}

// ID returns the cgroup's ID: the inode number of its directory, which is
// what bpf_get_current_cgroup_id() returns for tasks in it.
func (c *Cgroup) ID() uint64 { return c.id }

// Path returns the cgroup's path relative to the cgroup2 mount, starting with
// / (as in the "0::" line of /proc/<pid>/cgroup).
func (c *Cgroup) Path() string { return c.rel }

// Dir returns the cgroup's directory in the file system.
func (c *Cgroup) Dir() string { return filepath.Join(c.mount, c.rel) }

// Start starts cmd directly inside the cgroup (clone3 CLONE_INTO_CGROUP via
// SysProcAttr.UseCgroupFD), so the process never runs anywhere else. Its
// children inherit the cgroup: Start(ns.Command(...)) runs a program in both
// a network namespace and the cgroup. The caller still Waits for cmd.
func (c *Cgroup) Start(cmd *exec.Cmd) error {
	d, err := os.Open(c.Dir())
	if err != nil {
		return err
	}
	defer d.Close()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = int(d.Fd())
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s in cgroup %s: %w", cmd.Path, c.rel, err)
	}
	return nil
}

// Add moves the process pid into the cgroup.
func (c *Cgroup) Add(pid int) error {
	return os.WriteFile(filepath.Join(c.Dir(), "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
}

// Procs returns the IDs of the processes in the cgroup.
func (c *Cgroup) Procs() ([]int, error) {
	b, err := os.ReadFile(filepath.Join(c.Dir(), "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		pids = append(pids, pid)
	}
	return pids, nil
}

// remove kills every process in the cgroup and removes its directory.
func (c *Cgroup) remove() error {
	dir := c.Dir()
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids, err := c.Procs()
		if err != nil {
			return err
		}
		if len(pids) == 0 {
			break
		}
		// cgroup.kill (Linux 5.14+) kills the whole cgroup at once; fall
		// back to signalling each process.
		if os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0) != nil {
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v survive SIGKILL", c.rel, pids)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// rmdir fails with EBUSY until the killed tasks have fully exited.
	for {
		err := os.Remove(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("removing cgroup %s: %w", c.rel, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// CPU is the CPU time the cgroup's processes used so far (their BPF
// programs and uprobe traps included), from its cpu.stat.
func (c *Cgroup) CPU(t testing.TB) time.Duration {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(c.Dir(), "cpu.stat"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			us, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return time.Duration(us) * time.Microsecond
		}
	}
	t.Fatalf("no usage_usec in %s/cpu.stat", c.Dir())
	return 0
}
