// Package podmap maps kernel identities (cgroup IDs, interfaces, pod IPs)
// to the Kubernetes workloads they belong to.
//
//   - cgroups.go: cgroup v2 IDs to paths (any host).
//   - kubepods.go: the kubepods cgroup hierarchy of either cgroup driver to
//     pod UIDs and container IDs (the cgroup ID of a container is the inode
//     of its cgroup v2 directory).
//   - veth.go: a pod's veth on the node, from a process of the pod.
//   - kube.go: credentials, node name, and the informers (pods of the node,
//     Services, EndpointSlices, the agent's own ConfigMap).
//   - model.go: what to trace (Build): the selected pods, their server
//     ports and protocols (Istio port names, appProtocol), identities for
//     spans and peers by address.
//   - liveconfig.go: the ConfigMap's keys (clovisor_labels,
//     clovisor_egress_match, exporter, payload size, protocol overrides).
//   - index.go: the spans.Enricher the span exporter asks.
//
// The agent's reconciler (cmd/clovisor/kube.go) applies Build's result to
// the socket and wire tracers.
package podmap

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones).
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID parent major:minor root mountpoint options ... - fstype source superopts
		fields := strings.Fields(sc.Text())
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && len(fields) > 4 {
				return fields[4], nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup2 file system is mounted")
}

// CgroupResolver maps cgroup v2 IDs (what bpf_get_current_cgroup_id
// returns: the inode of the cgroup's directory) to their paths below the
// cgroup2 mount.
type CgroupResolver struct {
	mount string
	fd    int // the mount's directory, for open_by_handle_at

	mu       sync.Mutex
	cache    map[uint64]string
	lastWalk time.Time
}

// maxCgroupCache bounds the cache; it is dropped whole when full.
const maxCgroupCache = 65536

// NewCgroupResolver opens the cgroup2 mount.
func NewCgroupResolver() (*CgroupResolver, error) {
	m, err := Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open(m, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", m, err)
	}
	return &CgroupResolver{mount: m, fd: fd, cache: map[uint64]string{}}, nil
}

// Mount is the cgroup2 mount point.
func (r *CgroupResolver) Mount() string { return r.mount }

// Close releases the mount's descriptor.
func (r *CgroupResolver) Close() error { return unix.Close(r.fd) }

// Path returns the cgroup's path below the mount ("/system.slice/x.service"),
// or "" when the cgroup is unknown (it may be gone already).
func (r *CgroupResolver) Path(id uint64) string {
	if id == 0 {
		return ""
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if p, ok := r.cache[id]; ok {
		return p
	}
	p, err := r.byHandle(id)
	if err != nil {
		// Kernels or mounts without kernfs file handles: walk the tree,
		// at most once a second.
		if time.Since(r.lastWalk) > time.Second {
			r.walk()
			r.lastWalk = time.Now()
		}
		p = r.cache[id]
	}
	if len(r.cache) >= maxCgroupCache {
		clear(r.cache)
	}
	r.cache[id] = p
	return p
}

// Forget drops a cgroup from the cache (when it was removed).
func (r *CgroupResolver) Forget(id uint64) {
	r.mu.Lock()
	delete(r.cache, id)
	r.mu.Unlock()
}

// fileidKernfs is the kernfs file handle type: its 8-byte handle is the
// node id, which is the cgroup id.
const fileidKernfs = 0xfe

func (r *CgroupResolver) byHandle(id uint64) (string, error) {
	var b [8]byte
	binary.NativeEndian.PutUint64(b[:], id)
	fd, err := unix.OpenByHandleAt(r.fd, unix.NewFileHandle(fileidKernfs, b[:]), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return "", err
	}
	rel, err := filepath.Rel(r.mount, target)
	if err != nil || strings.HasPrefix(rel, "..") {
		return "", fmt.Errorf("cgroup %d resolves outside %s: %s", id, r.mount, target)
	}
	if rel == "." {
		return "/", nil
	}
	return "/" + rel, nil
}

func (r *CgroupResolver) walk() {
	_ = filepath.WalkDir(r.mount, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		rel, _ := filepath.Rel(r.mount, path)
		if rel == "." {
			rel = ""
		}
		if len(r.cache) < maxCgroupCache {
			r.cache[st.Ino] = "/" + rel
		}
		return nil
	})
}

// CgroupID returns the id of the cgroup at path (absolute, or relative to
// the cgroup2 mount): the inode of its directory.
func CgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
