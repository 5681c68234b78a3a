package podmap

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestHierarchyScan walks kubepods trees of both layouts (as plain
// directories: the walk only reads directory names and inodes).
func TestHierarchyScan(t *testing.T) {
	const (
		uid1 = "11111111-2222-3333-4444-555555555555"
		uid2 = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
		uid3 = "01234567-89ab-cdef-0123-456789abcdef"
	)
	id := func(c byte) string { return strings.Repeat(string(c), 64) }
	mount := t.TempDir()
	dirs := []string{
		// cgroupfs
		"kubepods/pod" + uid1 + "/" + id('a'),
		"kubepods/burstable/pod" + uid2 + "/" + id('b'),
		"kubepods/burstable/pod" + uid2 + "/" + id('c'),
		"kubepods/besteffort/pod" + uid3 + "/crio-" + id('d'),
		"kubepods/besteffort/pod" + uid3 + "/not-a-container",
		// systemd, below a kubelet --cgroup-root slice
		"kubelet.slice/kubelet-kubepods.slice",
		"kubepods.slice/kubepods-pod" + strings.ReplaceAll(uid1, "-", "_") + ".slice/cri-containerd-" + id('e') + ".scope",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(uid3, "-", "_") + ".slice/crio-" + id('f') + ".scope",
		"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + strings.ReplaceAll(uid3, "-", "_") + ".slice/crio-conmon-" + id('f') + ".scope",
		"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + strings.ReplaceAll(uid2, "-", "_") + ".slice/docker-" + id('0') + ".scope",
		"system.slice/containerd.service",
	}
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(mount, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	h, err := NewHierarchy(mount)
	if err != nil {
		t.Fatal(err)
	}
	got, err := h.Scan()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]ContainerCgroup{
		id('a'): {PodUID: uid1, QoS: "guaranteed", Path: "/kubepods/pod" + uid1 + "/" + id('a')},
		id('b'): {PodUID: uid2, QoS: "burstable"},
		id('c'): {PodUID: uid2, QoS: "burstable"},
		id('d'): {PodUID: uid3, QoS: "besteffort", Runtime: "cri-o"},
		id('e'): {PodUID: uid1, QoS: "guaranteed", Runtime: "containerd"},
		id('f'): {PodUID: uid3, QoS: "besteffort", Runtime: "cri-o"},
		id('0'): {PodUID: uid2, QoS: "burstable", Runtime: "docker"},
	}
	if len(got) != len(want) {
		t.Fatalf("found %d containers, want %d: %+v", len(got), len(want), got)
	}
	for cid, w := range want {
		g, ok := got[cid]
		if !ok {
			t.Errorf("container %s not found", cid[:8])
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(mount, g.Path), &st); err != nil || st.Ino != g.ID {
			t.Errorf("container %s: ID %d, path %s (inode %d, %v)", cid[:8], g.ID, g.Path, st.Ino, err)
		}
		if g.PodUID != w.PodUID || g.QoS != w.QoS || g.Runtime != w.Runtime || g.ContainerID != cid || (w.Path != "" && g.Path != w.Path) {
			t.Errorf("container %s: %+v, want %+v", cid[:8], g, w)
		}
	}
	// Explicit roots: only the tree below them.
	h2, _ := NewHierarchy(mount, mount+"/kubepods.slice")
	got2, _ := h2.Scan()
	if len(got2) != 3 {
		t.Errorf("below kubepods.slice: %d containers, want 3", len(got2))
	}
}
