package podmap

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup2"
)

// ContainerCgroup is one container's cgroup in the kubepods hierarchy.
type ContainerCgroup struct {
	// ID is the cgroup v2 ID: the inode of the cgroup's directory, what
	// bpf_get_current_cgroup_id() returns for the container's tasks.
	ID uint64
	// Path is the cgroup's path below the cgroup2 mount.
	Path string
	// PodUID is the pod's UID (with dashes, as the API has it).
	PodUID string
	// ContainerID is the bare container ID (64 hex digits for containerd,
	// CRI-O and docker), as in containerStatuses[].containerID after
	// "<runtime>://".
	ContainerID string
	// Runtime is "containerd", "cri-o", "docker" or "podman" when the
	// cgroup's name says so (systemd driver), "" otherwise (cgroupfs).
	Runtime string
	// QoS is the pod's QoS class as the hierarchy names it: "guaranteed",
	// "burstable" or "besteffort".
	QoS string
}

// Hierarchy finds the containers of pods in the kubepods cgroup hierarchy
// of the cgroup v2 mount, as the kubelet lays it out with either cgroup
// driver:
//
//	cgroupfs: kubepods/[burstable|besteffort/]pod<uid>/<container-id>
//	systemd:  kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid_with_underscores>.slice/
//	          <runtime>-<container-id>.scope   (cri-containerd-, crio-, docker-, libpod-)
//
// On hybrid hosts (cgroup v1 controllers plus cgroup2 at
// /sys/fs/cgroup/unified) the same layout is found in the cgroup2 mount
// when the container runtime places containers there (systemd driver);
// a container only in v1 hierarchies has no cgroup v2 directory of its own
// and cannot be told apart by cgroup ID.
type Hierarchy struct {
	mount string
	// roots are the directories searched, below the mount; empty means
	// those named kubepods or kubepods.slice at the top two levels.
	roots []string
}

// NewHierarchy returns a Hierarchy of the cgroup2 mount (mount "" means
// the one of this host). roots, when given, are the kubepods directories
// (absolute or below the mount) to search instead of the usual places: a
// kubelet with --cgroup-root, or a test bed.
func NewHierarchy(mount string, roots ...string) (*Hierarchy, error) {
	if mount == "" {
		m, err := Cgroup2Mount()
		if err != nil {
			return nil, err
		}
		mount = m
	}
	h := &Hierarchy{mount: mount}
	for _, r := range roots {
		if strings.HasPrefix(r, mount+"/") {
			r = strings.TrimPrefix(r, mount)
		}
		h.roots = append(h.roots, "/"+strings.Trim(r, "/"))
	}
	return h, nil
}

// Mount returns the cgroup2 mount point.
func (h *Hierarchy) Mount() string { return h.mount }

// CgroupMode names the host's cgroup mode (containerd/cgroups' detection):
// "unified", "hybrid", "legacy" or "unavailable".
func CgroupMode() string {
	switch cgroups.Mode() {
	case cgroups.Unified:
		return "unified"
	case cgroups.Hybrid:
		return "hybrid"
	case cgroups.Legacy:
		return "legacy"
	}
	return "unavailable"
}

// maxScanDepth bounds how deep below a root the scan looks for pods.
const maxScanDepth = 4

// Scan walks the hierarchy and returns every container cgroup found, by
// container ID.
func (h *Hierarchy) Scan() (map[string]ContainerCgroup, error) {
	roots := h.roots
	if len(roots) == 0 {
		roots = h.defaultRoots()
	}
	out := map[string]ContainerCgroup{}
	var errs []error
	for _, r := range roots {
		if err := h.scanDir(r, 0, nil, out); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return out, errors.Join(errs...)
}

// defaultRoots finds kubepods and kubepods.slice at the top two levels.
func (h *Hierarchy) defaultRoots() []string {
	var roots []string
	var look func(rel string, depth int)
	look = func(rel string, depth int) {
		ents, err := os.ReadDir(filepath.Join(h.mount, rel))
		if err != nil {
			return
		}
		for _, e := range ents {
			if !e.IsDir() {
				continue
			}
			child := rel + "/" + e.Name()
			if e.Name() == "kubepods" || e.Name() == "kubepods.slice" {
				roots = append(roots, child)
			} else if depth == 0 && strings.HasSuffix(e.Name(), ".slice") {
				look(child, depth+1) // e.g. kubelet.slice/kubelet-kubepods.slice
			}
		}
	}
	look("", 0)
	return roots
}

type podDir struct{ uid, qos string }

func (h *Hierarchy) scanDir(rel string, depth int, pod *podDir, out map[string]ContainerCgroup) error {
	ents, err := os.ReadDir(filepath.Join(h.mount, rel))
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		name, child := e.Name(), rel+"/"+e.Name()
		if pod != nil {
			id, runtime, ok := parseContainerDir(name)
			if !ok {
				continue
			}
			info, err := e.Info()
			if err != nil {
				continue // gone meanwhile
			}
			st, ok := info.Sys().(*syscall.Stat_t)
			if !ok {
				continue
			}
			out[id] = ContainerCgroup{ID: st.Ino, Path: child, PodUID: pod.uid, ContainerID: id, Runtime: runtime, QoS: pod.qos}
			continue
		}
		if uid, qos, ok := parsePodDir(name); ok {
			if qos == "" {
				qos = qosOf(rel)
			}
			if err := h.scanDir(child, depth+1, &podDir{uid: uid, qos: qos}, out); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			continue
		}
		if depth < maxScanDepth && isQoSDir(name) {
			if err := h.scanDir(child, depth+1, nil, out); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// isQoSDir recognises the QoS level directories between kubepods and pods.
func isQoSDir(name string) bool {
	switch name {
	case "burstable", "besteffort", "kubepods-burstable.slice", "kubepods-besteffort.slice":
		return true
	}
	return false
}

func qosOf(parentRel string) string {
	base := filepath.Base(parentRel)
	switch {
	case strings.Contains(base, "burstable"):
		return "burstable"
	case strings.Contains(base, "besteffort"):
		return "besteffort"
	}
	return "guaranteed"
}

// parsePodDir recognises a pod's cgroup directory: "pod<uid>" (cgroupfs)
// or "kubepods[-<qos>]-pod<uid_with_underscores>.slice" (systemd).
func parsePodDir(name string) (uid, qos string, ok bool) {
	if s, found := strings.CutSuffix(name, ".slice"); found {
		i := strings.LastIndex(s, "-pod")
		if i < 0 || !strings.HasPrefix(s, "kubepods") {
			return "", "", false
		}
		uid = strings.ReplaceAll(s[i+4:], "_", "-")
		switch s[:i] {
		case "kubepods":
			qos = "guaranteed"
		case "kubepods-burstable":
			qos = "burstable"
		case "kubepods-besteffort":
			qos = "besteffort"
		default:
			return "", "", false
		}
		return uid, qos, isUID(uid)
	}
	if uid, found := strings.CutPrefix(name, "pod"); found && isUID(uid) {
		return uid, "", true
	}
	return "", "", false
}

// isUID accepts the 8-4-4-4-12 hexadecimal form of pod UIDs.
func isUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch i {
		case 8, 13, 18, 23:
			if s[i] != '-' {
				return false
			}
		default:
			c := s[i]
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// runtimePrefixes are the systemd scope prefixes of container runtimes.
var runtimePrefixes = []struct{ prefix, runtime string }{
	{"cri-containerd-", "containerd"},
	{"crio-", "cri-o"},
	{"docker-", "docker"},
	{"libpod-", "podman"},
}

// parseContainerDir recognises a container's cgroup below a pod's:
// "<runtime>-<id>.scope" (systemd) or "<id>" / "crio-<id>" (cgroupfs).
// CRI-O's "crio-conmon-<id>.scope" (the monitor, not the container) is
// not one.
func parseContainerDir(name string) (id, runtime string, ok bool) {
	s := strings.TrimSuffix(name, ".scope")
	for _, p := range runtimePrefixes {
		if rest, found := strings.CutPrefix(s, p.prefix); found {
			if isContainerID(rest) {
				return rest, p.runtime, true
			}
			return "", "", false
		}
	}
	if s == name && isContainerID(s) {
		return s, "", true
	}
	return "", "", false
}

func isContainerID(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Procs returns the processes of a cgroup (a path below the mount).
func (h *Hierarchy) Procs(path string) ([]int, error) {
	m, err := cgroup2.Load(path, cgroup2.WithMountpoint(h.mount))
	if err != nil {
		return nil, err
	}
	pids, err := m.Procs(false)
	if err != nil {
		return nil, fmt.Errorf("processes of cgroup %s: %w", path, err)
	}
	out := make([]int, len(pids))
	for i, p := range pids {
		out[i] = int(p)
	}
	return out, nil
}

// SplitContainerID splits a containerStatuses[].containerID,
// "<runtime>://<id>", into its runtime and bare ID.
func SplitContainerID(s string) (runtime, id string) {
	if r, id, ok := strings.Cut(s, "://"); ok {
		return r, id
	}
	return "", s
}
